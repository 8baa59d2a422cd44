//! Building and running a micro-VM from a `VmConfig`: memory, kernel, legacy devices,
//! virtio-mmio devices, vCPUs and the device thread. Every step that can fail returns
//! a `StartError` naming what failed. The threads start last, so a failure before them
//! leaves nothing running; a failure while starting them (the device thread starts
//! first, then one thread per vCPU) leaves the threads already started running, with no
//! way to stop them: the caller must end the process (`wisp-vmm` exits).

use std::fs::File;
use std::io::{LineWriter, Write};
use std::ops::RangeInclusive;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use linux_loader::loader::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::{boot, layout, mptable};
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::gate::DeviceGate;
use crate::devices::legacy::{BootMarker, BootTimeline, Milestone, SerialConsole, I8042};
pub use crate::devices::virtio::fs::{CacheMode, SharedDirConfig};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, Tap, TapLink};
use crate::devices::virtio::VirtioDevice;
use crate::snapshot::{Header, Snapshot, TransportState, VcpuStateSupport, VmIdentity};
use crate::vstate::vcpu::{Vcpu, VcpuSet};
use crate::vstate::vm::Vm;
use crate::VmExit;
use vm_superio::serial::SerialState;

/// Where the guest console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    Off,
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// The host end of a network device: a tap queue opened with IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// A tap descriptor the caller opened and passed to the VMM (inherited).
    Fd(RawFd),
    /// A tap interface the VMM attaches to by name, creating it if it does not exist.
    Name(String),
}

/// One virtio-net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub backend: NetBackend,
    /// The guest's MAC address (unicast).
    pub mac: [u8; 6],
    /// The MTU the guest driver uses (VIRTIO_NET_F_MTU); `None` leaves it at 1500.
    pub mtu: Option<u16>,
}

/// Everything needed to start a VM; the `wisp-vmm` command line maps onto it.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Appended to the command line the VMM builds (console, devices).
    pub extra_cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub console: ConsoleOutput,
    pub vsock: Option<VsockConfig>,
    pub disks: Vec<DiskConfig>,
    /// Host directories shared over virtio-fs, one device each.
    pub shared_dirs: Vec<SharedDirConfig>,
    /// virtio-rng is on unless turned off.
    pub rng: bool,
    /// Network devices, one each: eth0, eth1, ... in this order.
    pub nets: Vec<NetConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Vcpu(#[from] crate::vstate::vcpu::VcpuError),
    #[error("console {path}: {source}")]
    Console { path: String, source: std::io::Error },
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
    #[error("too many virtio devices: at most {0}")]
    TooManyDevices(u32),
    #[error("restoring the snapshot: {0}")]
    Restore(String),
}

const MIN_MEMORY_MIB: u64 = 16;

/// How many vCPUs a VM may have: `MicroVm::start` refuses other counts, and
/// `wisp-vmm --vcpus` takes the same bounds. (wisp-config's `hypervisor.vcpus` repeats
/// them: that crate does not depend on this one.)
pub const VCPU_COUNTS: RangeInclusive<u8> = 1..=64;

/// A running micro-VM.
pub struct MicroVm {
    vcpus: Arc<VcpuSet>,
    vcpu_count: u8,
    exits_rx: Receiver<VmExit>,
    exits_tx: Sender<VmExit>,
    timeline: BootTimeline,
    console: Arc<Mutex<SerialConsole>>,
    vm: Arc<Vm>,
    /// The virtio-mmio transports in configuration order (a snapshot's devices).
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// Stops the device thread for a snapshot.
    devices: DeviceGate,
    /// What this host's KVM lets a snapshot save of a vCPU, or why it cannot.
    vcpu_support: Result<Arc<VcpuStateSupport>, String>,
    /// The configuration a snapshot's header names.
    identity: VmIdentity,
}

/// The parts of a running VM a snapshot reads (`snapshot::microvm` takes it).
#[derive(Clone)]
pub struct Snapshotter {
    pub(crate) vcpus: Arc<VcpuSet>,
    pub(crate) console: Arc<Mutex<SerialConsole>>,
    pub(crate) vm: Arc<Vm>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(crate) devices: DeviceGate,
    pub(crate) vcpu_support: Result<Arc<VcpuStateSupport>, String>,
    pub(crate) identity: VmIdentity,
}

/// A snapshot to restore, opened and its guest memory mapped (`snapshot::microvm`).
pub struct Restore {
    pub snapshot: Snapshot,
    pub memory: GuestMemoryMmap,
}

struct DeviceSetup<'a> {
    vm: &'a Vm,
    mmio: Bus,
    cmdline: Cmdline,
    events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    next: u32,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The saved transports, when restoring: device `next` gets the `next`th.
    saved: Option<&'a [TransportState]>,
}

impl DeviceSetup<'_> {
    /// Puts `dev` on the virtio-mmio bus: its register block, its irqfd, one ioeventfd
    /// per queue, a `virtio_mmio.device=` entry on the command line, and its events on
    /// the device thread.
    fn attach<D>(&mut self, name: &str, dev: D) -> Result<(), StartError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let err = |reason: String| StartError::Device { device: name.to_string(), reason };
        let irq = layout::IRQ_BASE + self.next;
        if irq > layout::IRQ_MAX {
            return Err(StartError::TooManyDevices(layout::IRQ_MAX - layout::IRQ_BASE + 1));
        }
        let base = layout::VIRTIO_MMIO_START + u64::from(self.next) * layout::VIRTIO_MMIO_SIZE;
        let dev = Arc::new(Mutex::new(dev));
        {
            let d = dev.lock().map_err(|_| err("device lock poisoned".into()))?;
            for (q, evt) in d.queue_events().iter().enumerate() {
                let addr = IoEventAddress::Mmio(base + crate::devices::virtio::mmio::NOTIFY_REG_OFFSET);
                self.vm.fd.register_ioevent(evt, &addr, q as u32).map_err(|e| err(format!("ioeventfd: {e}")))?;
            }
        }
        let transport = match self.saved {
            None => MmioTransport::new(self.vm.mem.clone(), dev.clone()).map_err(|e| err(format!("transport: {e}")))?,
            Some(saved) => {
                let state = saved
                    .get(self.next as usize)
                    .ok_or_else(|| err(format!("the snapshot has {} devices, the configuration more", saved.len())))?;
                // The irqfd is registered below: an interrupt the state re-raises is
                // latched in the eventfd until KVM takes it.
                MmioTransport::restore(self.vm.mem.clone(), dev.clone(), state)
                    .map_err(|e| err(format!("restoring the transport: {e}")))?
            }
        };
        self.vm.fd.register_irqfd(transport.irq_event(), irq).map_err(|e| err(format!("irqfd: {e}")))?;
        let transport = Arc::new(Mutex::new(transport));
        self.transports.push(transport.clone());
        self.mmio.insert(transport, base, layout::VIRTIO_MMIO_SIZE).map_err(|e| err(e.to_string()))?;
        self.cmdline
            .add_virtio_mmio_device(layout::VIRTIO_MMIO_SIZE, GuestAddress(base), irq, None)
            .map_err(|e| err(format!("command line: {e}")))?;
        self.events.add_subscriber(dev);
        self.next += 1;
        log::debug!("{name}: virtio-mmio at {base:#x}, irq {irq}");
        Ok(())
    }
}

/// The most a guest may write to a console file (`--console PATH`): the file is on the
/// host (the shim's is in its tmpfs state directory), the output is the guest's.
pub const CONSOLE_FILE_LIMIT: u64 = 16 << 20;

impl MicroVm {
    /// Creates and starts the VM. `start` is when the process started, for the boot
    /// timeline.
    pub fn start(config: &VmConfig, start: Instant) -> Result<Self, StartError> {
        Self::build(config, start, None)
    }

    /// Creates the VM a snapshot describes, on its mapped guest memory, and starts it
    /// where the snapshot left it. `config` names the host ends of the devices (tap,
    /// vsock socket, shared directory, disk); the devices themselves, vCPUs, memory and
    /// console must be the snapshot's (its header's configuration identity), or the
    /// snapshot is refused. The kernel and initrd are not read: the guest is in memory.
    pub fn restore(config: &VmConfig, restore: Restore, start: Instant) -> Result<Self, StartError> {
        Self::build(config, start, Some(restore))
    }

    fn build(config: &VmConfig, start: Instant, restore: Option<Restore>) -> Result<Self, StartError> {
        let timeline = BootTimeline::new(start);
        if restore.is_some() {
            // `snapshot::microvm::open` read the state file and mapped the memory
            // file just before.
            timeline.record(Milestone::SnapshotOpened);
        }
        if !VCPU_COUNTS.contains(&config.vcpus) {
            return Err(StartError::Config(format!(
                "vcpus must be {}..={}, got {}",
                VCPU_COUNTS.start(),
                VCPU_COUNTS.end(),
                config.vcpus
            )));
        }
        if config.memory_mib < MIN_MEMORY_MIB || config.memory_mib > (1 << 20) {
            return Err(StartError::Config(format!(
                "memory must be {MIN_MEMORY_MIB}..=1048576 MiB, got {}",
                config.memory_mib
            )));
        }
        let identity = crate::snapshot::microvm::vm_identity(config);
        match &restore {
            None => boot::check_images(&config.kernel, config.initrd.as_deref())?,
            Some(Restore { snapshot, .. }) => {
                // The configuration first (the memory size included), before any tap,
                // socket or KVM VM exists: a restore with other options is told which
                // differs, and leaves nothing behind.
                let mut as_configured = snapshot.header.clone();
                as_configured.config = identity.clone();
                snapshot.header.check_restorable(&as_configured).map_err(|e| StartError::Restore(e.to_string()))?;
            }
        }
        let nets = Self::open_nets(&config.nets)?;
        let mem_bytes = config.memory_mib << 20;
        let (vm, snapshot) = match restore {
            None => (Vm::new(mem_bytes)?, None),
            Some(Restore { snapshot, memory }) => {
                let vm = Vm::with_memory(mem_bytes, memory)?;
                let here = Header::this_host(&vm.supported_cpuid, vm.tsc_deadline, identity.clone())
                    .map_err(|e| StartError::Restore(format!("describing this host: {e}")))?;
                snapshot.header.check_restorable(&here).map_err(|e| StartError::Restore(e.to_string()))?;
                snapshot.vm.restore(&vm.fd).map_err(|e| StartError::Restore(e.to_string()))?;
                (vm, Some(snapshot))
            }
        };
        timeline.record(Milestone::KvmReady);

        let (exits_tx, exits_rx) = channel();
        let serial = snapshot.as_ref().map(|s| s.legacy.serial.clone());
        let (pio, console) = Self::legacy_devices(&vm, config, &exits_tx, &timeline, serial)?;

        let mut setup = DeviceSetup {
            vm: &vm,
            mmio: Bus::new(),
            cmdline: boot::base_cmdline(config.console != ConsoleOutput::Off)?,
            events: EventManager::new()
                .map_err(|e| StartError::Device { device: "event loop".into(), reason: e.to_string() })?,
            next: 0,
            transports: Vec::new(),
            saved: snapshot.as_ref().map(|s| s.devices.as_slice()),
        };
        if config.rng {
            setup.attach(
                "rng",
                crate::devices::virtio::rng::Rng::new()
                    .map_err(|e| StartError::Device { device: "rng".into(), reason: e.to_string() })?,
            )?;
        }
        for (i, d) in config.disks.iter().enumerate() {
            let name = format!("disk{i} ({})", d.path.display());
            let blk = crate::devices::virtio::block::Block::new(d.path.clone(), d.read_only, None)
                .map_err(|e| StartError::Device { device: name.clone(), reason: e.to_string() })?;
            setup.attach(&name, blk)?;
        }
        if let Some(v) = &config.vsock {
            let name = format!("vsock ({})", v.uds_path.display());
            let dev = crate::devices::virtio::vsock::Vsock::new(v.guest_cid, v.uds_path.clone())
                .map_err(|e| StartError::Device { device: name.clone(), reason: e.to_string() })?;
            setup.attach(&name, dev)?;
        }
        for (i, s) in config.shared_dirs.iter().enumerate() {
            let name = format!("fs{i} ({}={})", s.tag, s.path.display());
            let dev = crate::devices::virtio::fs::SharedDir::new(s)
                .map_err(|e| StartError::Device { device: name.clone(), reason: e.to_string() })?;
            setup.attach(&name, dev)?;
        }
        for (name, dev) in nets {
            setup.attach(&name, dev)?;
        }
        if !config.extra_cmdline.trim().is_empty() {
            setup
                .cmdline
                .insert_str(config.extra_cmdline.trim())
                .map_err(|e| StartError::Config(format!("kernel command line: {e}")))?;
        }
        let DeviceSetup { mmio, cmdline, mut events, transports, .. } = setup;
        timeline.record(Milestone::DevicesReady);
        let mut vcpus = Vec::new();
        match &snapshot {
            None => {
                let boot_info =
                    boot::load_guest(&vm.mem, mem_bytes, &config.kernel, config.initrd.as_deref(), &cmdline)?;
                mptable::setup_mptable(&vm.mem, config.vcpus)?;
                for i in 0..config.vcpus {
                    let v = Vcpu::new(&vm.fd, i)?;
                    v.configure(
                        &vm.mem,
                        &vm.supported_cpuid,
                        config.vcpus,
                        vm.tsc_deadline,
                        (i == 0).then_some(boot_info.entry),
                    )?;
                    vcpus.push(v);
                }
            }
            Some(snapshot) => {
                if transports.len() != snapshot.devices.len() || snapshot.vcpus.len() != usize::from(config.vcpus) {
                    return Err(StartError::Restore(format!(
                        "the snapshot has {} devices and {} vCPUs, the configuration {} and {}",
                        snapshot.devices.len(),
                        snapshot.vcpus.len(),
                        transports.len(),
                        config.vcpus
                    )));
                }
                for (i, state) in snapshot.vcpus.iter().enumerate() {
                    let v = Vcpu::new(&vm.fd, i as u8)?;
                    state.restore(v.fd()).map_err(|e| StartError::Restore(format!("vCPU {i}: {e}")))?;
                    vcpus.push(v);
                }
            }
        }
        timeline.record(if snapshot.is_some() { Milestone::VcpuStateLoaded } else { Milestone::KernelLoaded });
        // Before any vCPU runs (the probe reads and writes back MSRs on vCPU 0).
        let vcpu_support = VcpuStateSupport::probe(&vm.kvm, vcpus[0].fd()).map(Arc::new).map_err(|e| e.to_string());

        let (devices, gate_waker) = DeviceGate::new()
            .map_err(|e| StartError::Device { device: "device gate".into(), reason: e.to_string() })?;
        events.add_subscriber(Arc::new(Mutex::new(gate_waker)));
        let gate = devices.clone();

        let dev_exits = exits_tx.clone();
        std::thread::Builder::new()
            .name("devices".into())
            .stack_size(crate::THREAD_STACK)
            .spawn(move || {
                // Before the first event: every device's queue handling runs here.
                if let Err(e) = crate::seccomp::install_if_enabled(crate::seccomp::ThreadKind::Devices) {
                    let _ = dev_exits.send(VmExit::Error(format!("device thread: {e}")));
                    return;
                }
                // A panic in a device ends the VM (no device would be served any more).
                crate::panics::report_panics("device", &dev_exits, || loop {
                    if let Err(e) = events.run() {
                        let _ = dev_exits.send(VmExit::Error(format!("device event loop failed: {e}")));
                        return;
                    }
                    gate.park_if_stopped();
                    crate::seccomp::selftest_point(crate::seccomp::ThreadKind::Devices);
                });
            })
            .map_err(|e| StartError::Device { device: "device thread".into(), reason: e.to_string() })?;

        let vcpus = VcpuSet::start(vcpus, Arc::new(pio), Arc::new(mmio), exits_tx.clone())?;
        timeline.record(Milestone::VcpusStarted);
        Ok(Self {
            vcpus: Arc::new(vcpus),
            vcpu_count: config.vcpus,
            exits_rx,
            exits_tx,
            timeline,
            console,
            vm: Arc::new(vm),
            transports,
            devices,
            vcpu_support,
            identity,
        })
    }

    /// Opens (or takes over) every network device's tap before anything else opens files:
    /// inherited descriptors first, so a tap this process opens by name can never get
    /// the number of a descriptor the caller meant to pass.
    fn open_nets(nets: &[NetConfig]) -> Result<Vec<(String, Net)>, StartError> {
        let mut taps: Vec<Option<Tap>> = nets.iter().map(|_| None).collect();
        for (i, n) in nets.iter().enumerate() {
            if let NetBackend::Fd(fd) = n.backend {
                if nets[..i].iter().any(|m| m.backend == n.backend) {
                    return Err(StartError::Config(format!("network device {i}: tap descriptor {fd} is used twice")));
                }
                let tap = Tap::from_inherited_fd(fd)
                    .map_err(|e| StartError::Device { device: format!("net{i} (fd {fd})"), reason: e.to_string() })?;
                taps[i] = Some(tap);
            }
        }
        for (i, n) in nets.iter().enumerate() {
            if let NetBackend::Name(name) = &n.backend {
                let tap = Tap::open(name).map_err(|e| StartError::Device {
                    device: format!("net{i} (tap {name})"),
                    reason: e.to_string(),
                })?;
                taps[i] = Some(tap);
            }
        }
        nets.iter()
            .zip(taps)
            .enumerate()
            .map(|(i, (n, tap))| {
                let tap = tap.ok_or_else(|| StartError::Config(format!("network device {i} has no tap")))?;
                let name = format!("net{i} ({})", tap.label());
                let net = Net::new(Box::new(tap), n.mac, n.mtu)
                    .map_err(|e| StartError::Device { device: name.clone(), reason: e.to_string() })?;
                Ok((name, net))
            })
            .collect()
    }

    fn legacy_devices(
        vm: &Vm,
        config: &VmConfig,
        exits: &Sender<VmExit>,
        timeline: &BootTimeline,
        saved_serial: Option<Option<SerialState>>,
    ) -> Result<(Bus, Arc<Mutex<SerialConsole>>), StartError> {
        let mut pio = Bus::new();
        let out: Box<dyn Write + Send> = match &config.console {
            ConsoleOutput::Off => Box::new(std::io::sink()),
            ConsoleOutput::Stdout => Box::new(std::io::stdout()),
            ConsoleOutput::File(p) => {
                let f =
                    File::create(p).map_err(|source| StartError::Console { path: p.display().to_string(), source })?;
                Box::new(LineWriter::new(f))
            }
        };
        let dev_err = |device: &str, reason: String| StartError::Device { device: device.into(), reason };
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| dev_err("serial", e.to_string()))?;
        vm.fd.register_irqfd(&irq, layout::SERIAL_IRQ).map_err(|e| dev_err("serial", e.to_string()))?;
        let limit = matches!(config.console, ConsoleOutput::File(_)).then_some(CONSOLE_FILE_LIMIT);
        let console = match saved_serial {
            None => SerialConsole::new(irq, out, limit),
            Some(Some(regs)) => SerialConsole::restore(irq, out, limit, &regs).map_err(|e| dev_err("serial", e))?,
            Some(None) => return Err(StartError::Restore("the snapshot has no serial console state".into())),
        };
        let console = Arc::new(Mutex::new(console));
        let serial: Arc<Mutex<dyn BusDevice>> = console.clone();
        pio.insert(serial, u64::from(layout::SERIAL_PORT), 8).map_err(|e| dev_err("serial", e.to_string()))?;

        let reset_tx = Mutex::new(exits.clone());
        let i8042: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(I8042::new(Box::new(move || {
            if let Ok(tx) = reset_tx.lock() {
                let _ = tx.send(VmExit::GuestReset);
            }
        }))));
        pio.insert(i8042, u64::from(layout::I8042_PORT), layout::I8042_PORT_LEN)
            .map_err(|e| dev_err("i8042", e.to_string()))?;

        let marker: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(BootMarker::new(timeline.clone())));
        pio.insert(marker, u64::from(layout::BOOT_MARKER_PORT), 1)
            .map_err(|e| dev_err("boot marker", e.to_string()))?;
        Ok((pio, console))
    }

    /// Blocks until the VM ends and says why.
    pub fn wait(&self) -> VmExit {
        let exit =
            self.exits_rx.recv().unwrap_or_else(|_| VmExit::Error("all VM threads ended without a reason".into()));
        self.console.lock().unwrap_or_else(|e| e.into_inner()).flush_output();
        exit
    }

    /// A sender that ends the VM when something is sent (signals, control API).
    pub fn exit_sender(&self) -> Sender<VmExit> {
        self.exits_tx.clone()
    }

    /// The handle the control API works through.
    pub fn control(&self) -> crate::api::VmControl {
        crate::api::VmControl {
            vcpus: self.vcpus.clone(),
            timeline: self.timeline.clone(),
            exits: self.exits_tx.clone(),
            vcpu_count: self.vcpu_count,
            memory_bytes: self.vm.mem_bytes,
            snapshots: self.snapshotter(),
        }
    }

    /// What taking a snapshot of this VM works with (`snapshot::microvm`).
    pub fn snapshotter(&self) -> Snapshotter {
        Snapshotter {
            vcpus: self.vcpus.clone(),
            console: self.console.clone(),
            vm: self.vm.clone(),
            transports: self.transports.clone(),
            devices: self.devices.clone(),
            vcpu_support: self.vcpu_support.clone(),
            identity: self.identity.clone(),
        }
    }
}
