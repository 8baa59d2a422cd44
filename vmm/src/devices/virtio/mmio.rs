//! The virtio-mmio transport, register layout version 2 (virtio 1.2, section 4.2.2).
//!
//! One `MmioTransport` per device: the guest finds it through
//! `virtio_mmio.device=4K@<base>:<irq>` on the kernel command line and drives the device
//! through this 4 KiB register block. The transport owns feature negotiation, the device
//! status state machine and queue setup; on DRIVER_OK it builds the `Queue`s, checks them
//! against guest memory and hands them to the device model.
//!
//! Trust: every register value comes from the guest and is checked here; bad accesses are
//! logged (rate-limited) and ignored, a bad queue setup sets DEVICE_NEEDS_RESET; nothing a
//! guest writes can panic the VMM. The device model is trusted code.
//!
//! Queue notifications do not come through here: the VMM registers each queue's eventfd
//! as a KVM ioeventfd at `base + NOTIFY_REG_OFFSET` with datamatch = queue index. A write
//! that still reaches `write()` (no ioeventfd registered) is forwarded to the same eventfd.
//! Interrupts go out through `irq_event()`, which the VMM registers as a KVM irqfd.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_bindings::bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_PACKED,
    VIRTIO_F_RING_RESET,
};
use virtio_bindings::bindings::virtio_mmio::*;
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_ALIGN_SIZE, VRING_DESC_ALIGN_SIZE, VRING_USED_ALIGN_SIZE,
};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateError, GuestWarnings, Interrupt, InterruptKind, Queue, QueueT, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

mod state;

pub use state::TransportStateError;

/// Size of one device's register block; also the stride between devices.
pub const MMIO_REGION_SIZE: u64 = 0x1000;
/// Offset of QueueNotify: register each queue eventfd as an ioeventfd at
/// `base + NOTIFY_REG_OFFSET`, 4 bytes, datamatch = the queue index (u32).
pub const NOTIFY_REG_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// "virt" in little endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout; the legacy layout (1) is not offered.
const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest (no PCI-style vendor registry applies).
const VENDOR_ID: u32 = 0;
/// Start of the device-specific configuration space.
const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;
/// Reads of SHMLen/SHMBase for a region that does not exist (no shared memory regions).
const NO_SHM_REGION: u32 = u32::MAX;

// Split virtqueue area sizes (spec 2.7): per-entry size and fixed overhead
// (flags, idx and the event field) of each of the three areas.
const DESC_SIZE: u64 = 16;
const AVAIL_ENTRY_SIZE: u64 = 2;
const AVAIL_OVERHEAD: u64 = 6;
const USED_ENTRY_SIZE: u64 = 8;
const USED_OVERHEAD: u64 = 6;

/// Feature bits whose transport side is not implemented here (packed rings, queue reset,
/// notification data); never offered even if a device model lists them.
const UNSUPPORTED_TRANSPORT_FEATURES: u64 =
    (1 << VIRTIO_F_RING_PACKED) | (1 << VIRTIO_F_RING_RESET) | (1 << VIRTIO_F_NOTIFICATION_DATA);

// The status bits as u32 register values.
const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("cannot create the virtio-mmio interrupt eventfd: {0}")]
    IrqEventFd(#[source] io::Error),
    #[error("device type {device_type} declares queue {queue} with maximum size {size}; it must be a power of two from 1 to 32768")]
    QueueMaxSize { device_type: u32, queue: usize, size: u16 },
    #[error("device type {device_type} has {queues} queue maximum sizes but {events} queue eventfds")]
    QueueEventCount { device_type: u32, queues: usize, events: usize },
    #[error("queue {queue}: size {size} is not a power of two from 1 to {max}")]
    QueueSize { queue: usize, size: u32, max: u16 },
    #[error("queue {queue}: {area} address {addr:#x} is not aligned to {align} bytes")]
    QueueAlignment { queue: usize, area: &'static str, addr: u64, align: u64 },
    #[error("queue {queue}: {area} {addr:#x}+{len:#x} is not in guest memory")]
    QueueOutsideMemory { queue: usize, area: &'static str, addr: u64, len: u64 },
    #[error("queue {ready} is ready but queue {missing} before it is not")]
    QueueGap { ready: usize, missing: usize },
    #[error("the device model cannot be activated again after a reset")]
    NotReactivatable,
    #[error(transparent)]
    Activate(#[from] ActivateError),
}

/// The interrupt line of one transport: the InterruptStatus bits plus the irqfd. Shared
/// with the device model (`Interrupt`), which raises it from the device thread without
/// taking the transport's lock.
#[derive(Debug)]
pub struct MmioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl MmioInterrupt {
    fn new() -> io::Result<Self> {
        Ok(Self { status: AtomicU32::new(0), irq: EventFd::new(EFD_NONBLOCK)? })
    }

    /// The current InterruptStatus bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

impl Interrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        let bit = match kind {
            InterruptKind::Queue => VIRTIO_MMIO_INT_VRING,
            InterruptKind::Config => VIRTIO_MMIO_INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.write(1)
    }
}

/// What the driver wrote for one queue; turned into a `Queue` (and checked) at DRIVER_OK.
#[derive(Debug, Clone, Copy)]
struct QueueRegisters {
    max_size: u16,
    /// QueueNum as written (u32, so an oversized value is seen and refused, not truncated).
    size: u32,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl QueueRegisters {
    fn new(max_size: u16) -> Self {
        // Until the driver writes QueueNum, the queue has its maximum size.
        Self { max_size, size: u32::from(max_size), ready: false, desc_table: 0, avail_ring: 0, used_ring: 0 }
    }

    /// Builds the device side of the queue and checks it against guest memory: size a power
    /// of two no larger than the maximum, areas aligned and fully inside guest memory.
    fn build(&self, index: usize, mem: &GuestMemoryMmap, event_idx: bool) -> Result<Queue, MmioError> {
        let size_err = || MmioError::QueueSize { queue: index, size: self.size, max: self.max_size };
        let size = u16::try_from(self.size).map_err(|_| size_err())?;
        let mut queue = Queue::new(self.max_size).map_err(|_| size_err())?;
        queue.try_set_size(size).map_err(|_| size_err())?;

        let n = u64::from(size);
        let areas = [
            ("descriptor table", self.desc_table, VRING_DESC_ALIGN_SIZE, DESC_SIZE * n),
            ("available ring", self.avail_ring, VRING_AVAIL_ALIGN_SIZE, AVAIL_OVERHEAD + AVAIL_ENTRY_SIZE * n),
            ("used ring", self.used_ring, VRING_USED_ALIGN_SIZE, USED_OVERHEAD + USED_ENTRY_SIZE * n),
        ];
        for (area, addr, align, len) in areas {
            let align = u64::from(align);
            if addr % align != 0 {
                return Err(MmioError::QueueAlignment { queue: index, area, addr, align });
            }
            // `len` is at most 16 * 32768: it fits in usize.
            let in_memory = usize::try_from(len).is_ok_and(|l| mem.check_range(GuestAddress(addr), l));
            if !in_memory {
                return Err(MmioError::QueueOutsideMemory { queue: index, area, addr, len });
            }
        }
        // Alignment was checked above, so these cannot fail.
        let misaligned = |area, addr| MmioError::QueueAlignment { queue: index, area, addr, align: 0 };
        queue
            .try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(|_| misaligned("descriptor table", self.desc_table))?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(|_| misaligned("available ring", self.avail_ring))?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(|_| misaligned("used ring", self.used_ring))?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        // The crate's own check as well. It is slightly stricter than ours (it wants the
        // byte after each area to be guest memory too), which no real driver layout hits:
        // Linux page-aligns the rings and none of them ends on a page boundary.
        if !queue.is_valid(mem) {
            return Err(MmioError::QueueOutsideMemory { queue: index, area: "queue", addr: self.desc_table, len: 0 });
        }
        Ok(queue)
    }
}

/// A virtio device model behind a virtio-mmio register block.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Arc<Mutex<dyn VirtioDevice>>,
    device_type: u32,
    interrupt: Arc<MmioInterrupt>,
    /// Device features as offered: the model's minus what this transport cannot do.
    offered_features: u64,
    device_status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegisters>,
    shm_sel: u32,
    /// Set when the model refused a reset: it must not be activated again.
    reactivation_refused: bool,
    warnings: GuestWarnings,
}

impl MmioTransport {
    pub fn new(mem: GuestMemoryMmap, device: Arc<Mutex<dyn VirtioDevice>>) -> Result<Self, MmioError> {
        let (device_type, max_sizes, features) = {
            let dev = lock(&device);
            let device_type = dev.device_type();
            let max_sizes = dev.queue_max_sizes().to_vec();
            let events = dev.queue_events().len();
            if events != max_sizes.len() {
                return Err(MmioError::QueueEventCount { device_type, queues: max_sizes.len(), events });
            }
            (device_type, max_sizes, dev.avail_features())
        };
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (queue, &size) in max_sizes.iter().enumerate() {
            if Queue::new(size).is_err() {
                return Err(MmioError::QueueMaxSize { device_type, queue, size });
            }
            queues.push(QueueRegisters::new(size));
        }
        Ok(Self {
            mem,
            device,
            device_type,
            interrupt: Arc::new(MmioInterrupt::new().map_err(MmioError::IrqEventFd)?),
            offered_features: features & !UNSUPPORTED_TRANSPORT_FEATURES,
            device_status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            shm_sel: 0,
            reactivation_refused: false,
            warnings: GuestWarnings::new(),
        })
    }

    /// The eventfd to register as a KVM irqfd for this device's interrupt line.
    pub fn irq_event(&self) -> &EventFd {
        &self.interrupt.irq
    }

    /// The interrupt as the device model sees it (also handy for the VMM to raise a
    /// configuration-change interrupt).
    pub fn interrupt(&self) -> Arc<MmioInterrupt> {
        self.interrupt.clone()
    }

    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The Status register as the driver reads it.
    pub fn device_status(&self) -> u32 {
        self.device_status
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegisters> {
        let index = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(index)
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device_type,
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered_features as u32,
                1 => (self.offered_features >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.device_status,
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => NO_SHM_REGION,
            // The configuration space never changes under the driver's feet.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            _ => {
                self.warnings.warn(format_args!(
                    "virtio-mmio (device type {}): read of unknown or write-only register {offset:#x}",
                    self.device_type
                ));
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => self.write_queue(offset, |q| q.size = value),
            VIRTIO_MMIO_QUEUE_READY => self.write_queue(offset, |q| q.ready = value == 1),
            VIRTIO_MMIO_QUEUE_DESC_LOW => self.write_queue(offset, |q| set_low(&mut q.desc_table, value)),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => self.write_queue(offset, |q| set_high(&mut q.desc_table, value)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => self.write_queue(offset, |q| set_low(&mut q.avail_ring, value)),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => self.write_queue(offset, |q| set_high(&mut q.avail_ring, value)),
            VIRTIO_MMIO_QUEUE_USED_LOW => self.write_queue(offset, |q| set_low(&mut q.used_ring, value)),
            VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue(offset, |q| set_high(&mut q.used_ring, value)),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify_queue(value),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            VIRTIO_MMIO_STATUS => self.write_status(value),
            VIRTIO_MMIO_SHM_SEL => self.shm_sel = value,
            _ => self.warnings.warn(format_args!(
                "virtio-mmio (device type {}): write of {value:#x} to unknown or read-only register {offset:#x}",
                self.device_type
            )),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are negotiated after DRIVER and before FEATURES_OK (spec 3.1.1).
        if self.device_status & (DRIVER | FEATURES_OK | FAILED) != DRIVER {
            self.warnings.warn(format_args!(
                "virtio-mmio (device type {}): DriverFeatures written in status {:#x}, ignored",
                self.device_type, self.device_status
            ));
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.driver_features, value),
            1 => set_high(&mut self.driver_features, value),
            sel => self.warnings.warn(format_args!(
                "virtio-mmio (device type {}): DriverFeatures written with selector {sel}, ignored",
                self.device_type
            )),
        }
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK (spec 3.1.1 step 7).
    fn write_queue(&mut self, offset: u32, update: impl FnOnce(&mut QueueRegisters)) {
        let status = self.device_status & !NEEDS_RESET;
        if status & (FEATURES_OK | DRIVER_OK | FAILED) != FEATURES_OK {
            self.warnings.warn(format_args!(
                "virtio-mmio (device type {}): queue register {offset:#x} written in status {:#x}, ignored",
                self.device_type, self.device_status
            ));
            return;
        }
        let (device_type, sel) = (self.device_type, self.queue_sel);
        match self.selected_queue() {
            Some(queue) => update(queue),
            None => self.warnings.warn(format_args!(
                "virtio-mmio (device type {device_type}): queue register {offset:#x} written for queue {sel}, which does not exist"
            )),
        }
    }

    /// Only reached when no ioeventfd is registered for the queue: wake the device thread
    /// the same way KVM would have.
    fn notify_queue(&mut self, index: u32) {
        let result = {
            let device = lock(&self.device);
            usize::try_from(index).ok().and_then(|i| device.queue_events().get(i)).map(|evt| evt.write(1))
        };
        match result {
            Some(Ok(())) => {}
            Some(Err(e)) => self.warnings.error(format_args!(
                "virtio-mmio (device type {}): cannot signal queue {index}: {e}",
                self.device_type
            )),
            None => self.warnings.warn(format_args!(
                "virtio-mmio (device type {}): notification for queue {index}, which does not exist",
                self.device_type
            )),
        }
    }

    /// The device status state machine (spec 2.1 and 3.1.1): 0 resets; otherwise the
    /// driver adds one bit at a time, in order. Anything else is ignored.
    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // NEEDS_RESET is the device's bit: a driver doing read-modify-write echoes it back.
        let old = self.device_status & !NEEDS_RESET;
        let new = value & !NEEDS_RESET;
        if new == old {
            return;
        }
        let added = new & !old;
        if new & old != old || added.count_ones() != 1 {
            self.refuse_status(value);
            return;
        }
        match (old & !FAILED, added) {
            (_, FAILED) => self.device_status |= FAILED,
            _ if old & FAILED != 0 => self.refuse_status(value),
            (0, ACKNOWLEDGE) => self.device_status |= ACKNOWLEDGE,
            (s, DRIVER) if s == ACKNOWLEDGE => self.device_status |= DRIVER,
            (s, FEATURES_OK) if s == ACKNOWLEDGE | DRIVER => self.accept_features(),
            (s, DRIVER_OK) if s == ACKNOWLEDGE | DRIVER | FEATURES_OK => self.driver_ok(),
            _ => self.refuse_status(value),
        }
    }

    fn refuse_status(&mut self, value: u32) {
        self.warnings.warn(format_args!(
            "virtio-mmio (device type {}): status {value:#x} does not follow status {:#x}, ignored",
            self.device_type, self.device_status
        ));
    }

    /// FEATURES_OK sticks only if the driver accepted a subset of the offer including
    /// VERSION_1; otherwise it stays clear and the driver, reading it back, gives up.
    fn accept_features(&mut self) {
        let unknown = self.driver_features & !self.offered_features;
        if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            self.warnings.warn(format_args!(
                "virtio-mmio (device type {}): driver features {:#x} refused (offered {:#x}; not offered: {unknown:#x}; VERSION_1 required)",
                self.device_type, self.driver_features, self.offered_features
            ));
            return;
        }
        lock(&self.device).set_acked_features(self.driver_features);
        self.device_status |= FEATURES_OK;
    }

    fn driver_ok(&mut self) {
        self.device_status |= DRIVER_OK;
        // The guest can fail an activation, reset and try again without end: these go
        // against its message budget.
        if let Err(e) = self.activate() {
            self.warnings.error(format_args!(
                "virtio-mmio (device type {}): activation failed, device needs a reset: {e}",
                self.device_type
            ));
            self.device_status |= NEEDS_RESET;
            if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
                self.warnings
                    .error(format_args!("virtio-mmio (device type {}): cannot raise interrupt: {e}", self.device_type));
            }
        }
    }

    fn activate(&mut self) -> Result<(), MmioError> {
        if self.reactivation_refused {
            return Err(MmioError::NotReactivatable);
        }
        let queues = self.build_queues()?;
        self.activate_with(queues)
    }

    /// The ready queues as the driver set them up, checked: no unready queue before a
    /// ready one, each valid against guest memory.
    fn build_queues(&self) -> Result<Vec<Queue>, MmioError> {
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut first_unready = None;
        for (index, regs) in self.queues.iter().enumerate() {
            if !regs.ready {
                first_unready.get_or_insert(index);
                continue;
            }
            if let Some(missing) = first_unready {
                return Err(MmioError::QueueGap { ready: index, missing });
            }
            queues.push(regs.build(index, &self.mem, event_idx)?);
        }
        Ok(queues)
    }

    fn activate_with(&mut self, queues: Vec<Queue>) -> Result<(), MmioError> {
        let interrupt: Arc<dyn Interrupt> = self.interrupt.clone();
        lock(&self.device).activate(self.mem.clone(), interrupt, queues)?;
        Ok(())
    }

    fn reset(&mut self) {
        {
            let mut device = lock(&self.device);
            if device.is_activated() && !device.reset() {
                log::error!(
                    "virtio-mmio (device type {}): the device model cannot be reset; it stays stopped",
                    self.device_type
                );
                self.reactivation_refused = true;
            }
        }
        self.device_status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
        for queue in &mut self.queues {
            *queue = QueueRegisters::new(queue.max_size);
        }
        self.interrupt.clear();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match register_offset(offset, data.len()) {
            Some(reg) => {
                let value = self.read_register(reg).to_le_bytes();
                data.copy_from_slice(&value);
            }
            None => {
                data.fill(0);
                self.warnings.warn(format_args!(
                    "virtio-mmio (device type {}): {}-byte read at {offset:#x}; registers take aligned 4-byte accesses",
                    self.device_type,
                    data.len()
                ));
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match (register_offset(offset, data.len()), <[u8; 4]>::try_from(data)) {
            (Some(reg), Ok(bytes)) => self.write_register(reg, u32::from_le_bytes(bytes)),
            _ => self.warnings.warn(format_args!(
                "virtio-mmio (device type {}): {}-byte write at {offset:#x}; registers take aligned 4-byte accesses",
                self.device_type,
                data.len()
            )),
        }
    }
}

/// The register addressed by an access, if it is an aligned 4-byte access.
fn register_offset(offset: u64, len: usize) -> Option<u32> {
    let aligned = offset & 0b11 == 0;
    (len == 4 && aligned).then(|| u32::try_from(offset).ok()).flatten()
}

fn set_low(reg: &mut u64, value: u32) {
    *reg = (*reg & !0xffff_ffff) | u64::from(value);
}

fn set_high(reg: &mut u64, value: u32) {
    *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
}

/// A device model that panicked holding its lock keeps its last state; the guest can
/// still reset it.
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{guest_memory, GuestQueue, MEM_SIZE};

    /// A device model that records what the transport did to it.
    pub(super) struct FakeDevice {
        max_sizes: Vec<u16>,
        events: Vec<EventFd>,
        pub(super) acked: Option<u64>,
        pub(super) activated_with: Option<usize>,
        /// The queues of the last activation (`activated_with` is their count).
        pub(super) queues: Vec<Queue>,
        /// Whether it can give its queue positions for a snapshot.
        pub(super) snapshottable: bool,
        refuse_activation: bool,
        resettable: bool,
        resets: usize,
        config: [u8; 8],
    }

    impl FakeDevice {
        pub(super) fn new(max_sizes: &[u16]) -> Self {
            Self {
                max_sizes: max_sizes.to_vec(),
                events: max_sizes.iter().map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect(),
                acked: None,
                activated_with: None,
                queues: Vec::new(),
                snapshottable: true,
                refuse_activation: false,
                resettable: true,
                resets: 0,
                config: [1, 2, 3, 4, 5, 6, 7, 8],
            }
        }
    }

    pub(super) const FAKE_FEATURES: u64 = VIRTIO_F_VERSION_1 | 0b101;

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            super::super::TYPE_RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.events
        }
        fn avail_features(&self) -> u64 {
            FAKE_FEATURES | (1 << VIRTIO_F_RING_PACKED)
        }
        fn set_acked_features(&mut self, acked: u64) {
            self.acked = Some(acked);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(c) = self.config.get_mut(offset as usize + i) {
                    *c = *b;
                }
            }
        }
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            _: Arc<dyn Interrupt>,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            if self.refuse_activation {
                return Err(ActivateError::Device("refused".into()));
            }
            if queues.len() != self.max_sizes.len() {
                return Err(ActivateError::QueueCount { got: queues.len(), want: self.max_sizes.len() });
            }
            self.activated_with = Some(queues.len());
            self.queues = queues;
            Ok(())
        }
        fn reset(&mut self) -> bool {
            self.resets += 1;
            self.activated_with = None;
            self.resettable
        }
        fn is_activated(&self) -> bool {
            self.activated_with.is_some()
        }
        fn queue_positions(&self) -> Result<Vec<super::super::QueuePosition>, String> {
            if !self.snapshottable {
                return Err("the fake holds a connection".into());
            }
            Ok(self.queues.iter().map(super::super::QueuePosition::of).collect())
        }
    }

    pub(super) struct Rig {
        pub(super) mem: GuestMemoryMmap,
        pub(super) fake: Arc<Mutex<FakeDevice>>,
        pub(super) mmio: MmioTransport,
    }

    pub(super) fn rig(max_sizes: &[u16]) -> Rig {
        let mem = guest_memory();
        let fake = Arc::new(Mutex::new(FakeDevice::new(max_sizes)));
        let mmio = MmioTransport::new(mem.clone(), fake.clone()).unwrap();
        Rig { mem, fake, mmio }
    }

    impl Rig {
        pub(super) fn r(&mut self, offset: u32) -> u32 {
            let mut data = [0xaa; 4];
            self.mmio.read(u64::from(offset), &mut data);
            u32::from_le_bytes(data)
        }
        pub(super) fn w(&mut self, offset: u32, value: u32) {
            self.mmio.write(u64::from(offset), &value.to_le_bytes());
        }
        pub(super) fn status(&mut self) -> u32 {
            self.r(VIRTIO_MMIO_STATUS)
        }
        /// Linux's virtio_add_status: read, OR in the bit, write back.
        pub(super) fn add_status(&mut self, bit: u32) {
            let s = self.status();
            self.w(VIRTIO_MMIO_STATUS, s | bit);
        }
        pub(super) fn negotiate(&mut self, features: u64) {
            self.w(VIRTIO_MMIO_STATUS, 0);
            self.add_status(ACKNOWLEDGE);
            self.add_status(DRIVER);
            for sel in 0..2 {
                self.w(VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel);
                self.w(VIRTIO_MMIO_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
            }
            self.add_status(FEATURES_OK);
        }
        fn setup_queue(&mut self, index: u32, size: u32, q: (GuestAddress, GuestAddress, GuestAddress)) {
            self.w(VIRTIO_MMIO_QUEUE_SEL, index);
            self.w(VIRTIO_MMIO_QUEUE_NUM, size);
            for (low, addr) in [
                (VIRTIO_MMIO_QUEUE_DESC_LOW, q.0),
                (VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.1),
                (VIRTIO_MMIO_QUEUE_USED_LOW, q.2),
            ] {
                self.w(low, addr.0 as u32);
                self.w(low + 4, (addr.0 >> 32) as u32);
            }
            self.w(VIRTIO_MMIO_QUEUE_READY, 1);
        }
        /// Lays out queue `index` at 64 KiB * index and sets it up.
        pub(super) fn setup_good_queue(&mut self, index: u32, size: u16) {
            let mem = self.mem.clone();
            let gq = GuestQueue::at(&mem, GuestAddress(0x1_0000 * u64::from(index)), size);
            self.setup_queue(index, u32::from(size), (gq.desc_table_addr(), gq.avail_addr(), gq.used_addr()));
        }
    }

    #[test]
    fn identification_registers() {
        let mut rig = rig(&[16]);
        assert_eq!(rig.r(VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rig.r(VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rig.r(VIRTIO_MMIO_DEVICE_ID), super::super::TYPE_RNG);
        assert_eq!(rig.r(VIRTIO_MMIO_VENDOR_ID), 0);
        rig.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rig.r(VIRTIO_MMIO_DEVICE_FEATURES), 0b101);
        rig.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        // VERSION_1 offered; RING_PACKED (bit 34) filtered out by the transport.
        assert_eq!(rig.r(VIRTIO_MMIO_DEVICE_FEATURES), 1);
        rig.w(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7);
        assert_eq!(rig.r(VIRTIO_MMIO_DEVICE_FEATURES), 0);
        rig.w(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(rig.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        rig.w(VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(rig.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        rig.w(VIRTIO_MMIO_SHM_SEL, 0);
        assert_eq!(rig.r(VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
        assert_eq!(rig.r(VIRTIO_MMIO_SHM_LEN_HIGH), u32::MAX);
        assert_eq!(rig.r(VIRTIO_MMIO_CONFIG_GENERATION), 0);
    }

    #[test]
    fn negotiation_happy_path_activates_the_device() {
        let mut rig = rig(&[16, 8]);
        rig.negotiate(FAKE_FEATURES);
        assert_eq!(rig.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(rig.fake.lock().unwrap().acked, Some(FAKE_FEATURES));
        rig.setup_good_queue(0, 16);
        rig.setup_good_queue(1, 4);
        rig.w(VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(rig.r(VIRTIO_MMIO_QUEUE_READY), 1);
        rig.add_status(DRIVER_OK);
        assert_eq!(rig.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(rig.fake.lock().unwrap().activated_with, Some(2));
        assert_eq!(rig.mmio.interrupt().status(), 0);
    }

    #[test]
    fn features_outside_the_offer_or_without_version_1_are_refused() {
        let mut rig = rig(&[16]);
        rig.negotiate(FAKE_FEATURES | 0b10);
        assert_eq!(rig.status(), ACKNOWLEDGE | DRIVER, "FEATURES_OK must not stick");
        assert_eq!(rig.fake.lock().unwrap().acked, None);
        // The driver gives up; later writes other than reset do nothing.
        rig.add_status(FAILED);
        assert_eq!(rig.status(), ACKNOWLEDGE | DRIVER | FAILED);
        rig.add_status(FEATURES_OK);
        assert_eq!(rig.status(), ACKNOWLEDGE | DRIVER | FAILED);

        rig.negotiate(0b101);
        assert_eq!(rig.status(), ACKNOWLEDGE | DRIVER, "VERSION_1 is required");

        // A packed ring was filtered from the offer, so accepting it is refused too.
        rig.negotiate(FAKE_FEATURES | (1 << VIRTIO_F_RING_PACKED));
        assert_eq!(rig.status(), ACKNOWLEDGE | DRIVER);
    }

    #[test]
    fn out_of_order_status_writes_are_ignored() {
        let mut rig = rig(&[16]);
        rig.w(VIRTIO_MMIO_STATUS, DRIVER);
        assert_eq!(rig.status(), 0);
        rig.add_status(ACKNOWLEDGE);
        rig.w(VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(rig.status(), ACKNOWLEDGE, "two bits at once");
        rig.add_status(DRIVER_OK);
        assert_eq!(rig.status(), ACKNOWLEDGE, "skipping steps");
        rig.add_status(DRIVER);
        rig.w(VIRTIO_MMIO_STATUS, DRIVER);
        assert_eq!(rig.status(), ACKNOWLEDGE | DRIVER, "clearing a bit without reset");
        // Features written before DRIVER or after FEATURES_OK do not count.
        rig.add_status(FEATURES_OK);
        assert_eq!(rig.status(), ACKNOWLEDGE | DRIVER, "no VERSION_1 acked yet");
        assert_eq!(rig.fake.lock().unwrap().activated_with, None);
    }

    #[test]
    fn queue_registers_are_writable_only_during_setup() {
        let mut rig = rig(&[16]);
        rig.setup_good_queue(0, 16);
        assert_eq!(rig.r(VIRTIO_MMIO_QUEUE_READY), 0, "before FEATURES_OK");
        rig.negotiate(FAKE_FEATURES);
        rig.setup_good_queue(0, 16);
        // Writes to a queue that does not exist go nowhere.
        rig.w(VIRTIO_MMIO_QUEUE_SEL, 5);
        rig.w(VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(rig.r(VIRTIO_MMIO_QUEUE_READY), 0);
        rig.add_status(DRIVER_OK);
        rig.w(VIRTIO_MMIO_QUEUE_SEL, 0);
        rig.w(VIRTIO_MMIO_QUEUE_READY, 0);
        assert_eq!(rig.r(VIRTIO_MMIO_QUEUE_READY), 1, "after DRIVER_OK");
    }

    fn assert_needs_reset(rig: &mut Rig) {
        assert_eq!(rig.status() & NEEDS_RESET, NEEDS_RESET);
        assert_eq!(rig.fake.lock().unwrap().activated_with, None);
        assert_eq!(rig.mmio.interrupt().status(), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(rig.mmio.irq_event().read().unwrap(), 1);
    }

    #[test]
    fn invalid_queue_setups_set_needs_reset() {
        let good = |rig: &Rig| {
            let gq = GuestQueue::new(&rig.mem, 16);
            (gq.desc_table_addr(), gq.avail_addr(), gq.used_addr())
        };
        type Breakage = fn(&mut (GuestAddress, GuestAddress, GuestAddress), &mut u32);
        let cases: [(&str, Breakage); 8] = [
            ("size not a power of two", |_, size| *size = 12),
            ("size zero", |_, size| *size = 0),
            ("size above max", |_, size| *size = 32),
            ("size above u16", |_, size| *size = 0x1_0010),
            ("descriptor table misaligned", |q, _| q.0 = GuestAddress(q.0 .0 + 8)),
            ("used ring misaligned", |q, _| q.2 = GuestAddress(q.2 .0 + 2)),
            ("avail ring outside memory", |q, _| q.1 = GuestAddress(MEM_SIZE as u64 - 4)),
            ("used ring far outside memory", |q, _| q.2 = GuestAddress(u64::MAX - 3)),
        ];
        for (what, breakage) in cases {
            let mut rig = rig(&[16]);
            rig.negotiate(FAKE_FEATURES);
            let (mut layout, mut size) = (good(&rig), 16);
            breakage(&mut layout, &mut size);
            rig.setup_queue(0, size, layout);
            rig.add_status(DRIVER_OK);
            assert_eq!(rig.status() & NEEDS_RESET, NEEDS_RESET, "{what}");
            assert_needs_reset(&mut rig);
            // The driver echoes NEEDS_RESET back when it sets FAILED; then resets.
            rig.add_status(FAILED);
            assert_eq!(rig.status() & FAILED, FAILED, "{what}");
            rig.w(VIRTIO_MMIO_STATUS, 0);
            assert_eq!(rig.status(), 0, "{what}");
        }
    }

    #[test]
    fn queue_gap_and_activation_errors_set_needs_reset() {
        let mut rig = rig(&[16, 16]);
        rig.negotiate(FAKE_FEATURES);
        rig.setup_good_queue(1, 16);
        rig.add_status(DRIVER_OK);
        assert_needs_reset(&mut rig);

        let mut rig = self::rig(&[16, 16]);
        rig.negotiate(FAKE_FEATURES);
        rig.setup_good_queue(0, 16);
        rig.add_status(DRIVER_OK);
        assert_needs_reset(&mut rig); // QueueCount from the device

        let mut rig = self::rig(&[16]);
        rig.fake.lock().unwrap().refuse_activation = true;
        rig.negotiate(FAKE_FEATURES);
        rig.setup_good_queue(0, 16);
        rig.add_status(DRIVER_OK);
        assert_needs_reset(&mut rig);
    }

    /// A guest that fails activation, resets and tries again forever gets its budget of
    /// error lines and no more.
    #[test]
    fn repeated_activation_failures_stay_within_the_guest_budget() {
        let mut rig = rig(&[16]);
        rig.fake.lock().unwrap().refuse_activation = true;
        for _ in 0..GuestWarnings::BUDGET + 10 {
            rig.negotiate(FAKE_FEATURES);
            rig.setup_good_queue(0, 16);
            rig.add_status(DRIVER_OK);
            assert_needs_reset(&mut rig);
        }
        assert_eq!(rig.mmio.warnings.left(), 0, "activation errors are counted against the guest's budget");
    }

    #[test]
    fn wrong_widths_and_unknown_offsets_are_ignored() {
        let mut rig = rig(&[16]);
        let mut two = [0xaa; 2];
        rig.mmio.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut two);
        assert_eq!(two, [0, 0]);
        let mut eight = [0xaa; 8];
        rig.mmio.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut eight);
        assert_eq!(eight, [0; 8]);
        let mut unaligned = [0xaa; 4];
        rig.mmio.read(1, &mut unaligned);
        assert_eq!(unaligned, [0; 4]);
        // A 1-byte status write and an 8-byte one change nothing.
        rig.mmio.write(u64::from(VIRTIO_MMIO_STATUS), &[ACKNOWLEDGE as u8]);
        rig.mmio.write(u64::from(VIRTIO_MMIO_STATUS), &u64::from(ACKNOWLEDGE).to_le_bytes());
        assert_eq!(rig.status(), 0);
        // Unknown, legacy and read-only registers.
        assert_eq!(rig.r(0xfc - 0x10), 0);
        assert_eq!(rig.r(VIRTIO_MMIO_QUEUE_PFN), 0);
        rig.w(VIRTIO_MMIO_GUEST_PAGE_SIZE, 4096);
        rig.w(VIRTIO_MMIO_MAGIC_VALUE, 0);
        rig.w(VIRTIO_MMIO_INTERRUPT_STATUS, 3);
        rig.w(VIRTIO_MMIO_QUEUE_NUM_MAX, 1);
        assert_eq!(rig.r(VIRTIO_MMIO_MAGIC_VALUE), MAGIC_VALUE);
        rig.w(VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(rig.r(VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        // More warnings than the budget: still no panic.
        for _ in 0..100 {
            rig.w(0x44, 1);
        }
    }

    #[test]
    fn config_space_goes_to_the_device_at_any_width() {
        let mut rig = rig(&[16]);
        let mut b = [0u8; 1];
        rig.mmio.read(0x100 + 2, &mut b);
        assert_eq!(b, [3]);
        let mut w = [0u8; 4];
        rig.mmio.read(0x104, &mut w);
        assert_eq!(w, [5, 6, 7, 8]);
        let mut q = [0xffu8; 8];
        rig.mmio.read(0x104, &mut q);
        assert_eq!(q, [5, 6, 7, 8, 0, 0, 0, 0]);
        rig.mmio.write(0x100, &[9, 9]);
        rig.mmio.read(0x100, &mut w);
        assert_eq!(w, [9, 9, 3, 4]);
        rig.mmio.read(0xfff, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn interrupt_status_and_ack() {
        let mut rig = rig(&[16]);
        let irq = rig.mmio.interrupt();
        irq.trigger(InterruptKind::Queue).unwrap();
        irq.trigger(InterruptKind::Config).unwrap();
        assert_eq!(rig.r(VIRTIO_MMIO_INTERRUPT_STATUS), 3);
        assert_eq!(rig.mmio.irq_event().read().unwrap(), 2);
        rig.w(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(rig.r(VIRTIO_MMIO_INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        rig.w(VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(rig.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_notify_write_signals_the_queue_eventfd() {
        let mut rig = rig(&[16, 16]);
        rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        rig.w(VIRTIO_MMIO_QUEUE_NOTIFY, 9);
        let fake = rig.fake.lock().unwrap();
        assert_eq!(fake.events[1].read().unwrap(), 2);
        assert!(fake.events[0].read().is_err(), "queue 0 was not notified");
    }

    #[test]
    fn reset_returns_everything_to_the_initial_state_and_allows_reactivation() {
        let mut rig = rig(&[16]);
        rig.negotiate(FAKE_FEATURES);
        rig.setup_good_queue(0, 8);
        rig.add_status(DRIVER_OK);
        rig.mmio.interrupt().trigger(InterruptKind::Queue).unwrap();
        rig.w(VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rig.status(), 0);
        assert_eq!(rig.r(VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(rig.r(VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(rig.fake.lock().unwrap().resets, 1);
        assert!(!rig.fake.lock().unwrap().is_activated());
        // A second driver probe works.
        rig.negotiate(FAKE_FEATURES);
        rig.setup_good_queue(0, 16);
        rig.add_status(DRIVER_OK);
        assert_eq!(rig.status(), ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert!(rig.fake.lock().unwrap().is_activated());
    }

    #[test]
    fn reset_of_an_inactive_device_does_not_call_the_model_and_refused_reset_blocks_activation() {
        let mut rig = rig(&[16]);
        rig.w(VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rig.fake.lock().unwrap().resets, 0);

        rig.fake.lock().unwrap().resettable = false;
        rig.negotiate(FAKE_FEATURES);
        rig.setup_good_queue(0, 16);
        rig.add_status(DRIVER_OK);
        rig.w(VIRTIO_MMIO_STATUS, 0);
        assert_eq!(rig.fake.lock().unwrap().resets, 1);
        rig.negotiate(FAKE_FEATURES);
        rig.setup_good_queue(0, 16);
        rig.add_status(DRIVER_OK);
        assert_eq!(rig.status() & NEEDS_RESET, NEEDS_RESET);
    }

    #[test]
    fn constructor_checks_the_device_model() {
        let mem = guest_memory();
        let bad = Arc::new(Mutex::new(FakeDevice::new(&[12])));
        assert!(matches!(MmioTransport::new(mem.clone(), bad), Err(MmioError::QueueMaxSize { size: 12, .. })));
        let mut fake = FakeDevice::new(&[16]);
        fake.events.clear();
        let bad = Arc::new(Mutex::new(fake));
        assert!(matches!(MmioTransport::new(mem, bad), Err(MmioError::QueueEventCount { .. })));
    }
}
