//! vCPUs: per-vCPU setup (CPUID, MSRs, FPU, LAPIC, boot registers) and the run loop
//! that turns KVM exits into bus accesses. Each vCPU runs on its own thread; the VMM
//! pauses or stops them by setting the shared run state and kicking the threads out of
//! KVM_RUN with a signal.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::{cpuid, interrupts, msr, regs};
use crate::devices::bus::Bus;
use crate::snapshot::{VcpuState, VcpuStateSupport};
use crate::VmExit;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("creating vCPU {index}: {source}")]
    Create { index: u8, source: kvm_ioctls::Error },
    #[error("configuring vCPU {index}: {reason}")]
    Configure { index: u8, reason: String },
    #[error("starting the vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

impl Vcpu {
    pub fn new(vm: &VmFd, index: u8) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(u64::from(index)).map_err(|source| VcpuError::Create { index, source })?;
        Ok(Self { index, fd })
    }

    /// The KVM vCPU, for callers that set up registers themselves (tests with tiny
    /// payloads).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Sets CPUID, MSRs, FPU and LAPIC; the boot vCPU (`entry` given) also gets the
    /// registers and tables of the boot protocol. Others wait for INIT/SIPI.
    pub fn configure(
        &self,
        mem: &GuestMemoryMmap,
        supported: &CpuId,
        count: u8,
        tsc_deadline: bool,
        entry: Option<regs::EntryPoint>,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        let err = |reason: String| VcpuError::Configure { index, reason };
        let mut cpuid = supported.clone();
        cpuid::filter_for_vcpu(&mut cpuid, index, count, tsc_deadline);
        self.fd.set_cpuid2(&cpuid).map_err(|e| err(format!("CPUID: {e}")))?;
        msr::setup_msrs(&self.fd).map_err(|e| err(e.to_string()))?;
        regs::setup_fpu(&self.fd).map_err(|e| err(e.to_string()))?;
        interrupts::set_lint(&self.fd).map_err(|e| err(format!("LAPIC: {e}")))?;
        if let Some(entry) = entry {
            regs::setup_regs(&self.fd, entry).map_err(|e| err(e.to_string()))?;
            regs::setup_sregs(mem, &self.fd, entry).map_err(|e| err(e.to_string()))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
}

/// What the VMM asks of a parked vCPU thread, and its answer.
enum Mail {
    Empty,
    /// Read this vCPU's state (a snapshot).
    Capture(Arc<VcpuStateSupport>),
    Captured(Box<Result<VcpuState, String>>),
}

/// The run state and the parked threads' mailboxes, under one lock so a request and
/// the condition variable never miss each other.
struct Shared {
    run: RunState,
    /// By vCPU index.
    mail: Vec<Mail>,
}

/// Shared by the VMM and all vCPU threads: the requested run state, how many vCPUs
/// are currently parked in the paused state, and their mailboxes.
pub struct RunControl {
    shared: Mutex<Shared>,
    changed: Condvar,
    parked: AtomicUsize,
}

impl RunControl {
    fn new(vcpus: usize) -> Self {
        let mail = (0..vcpus).map(|_| Mail::Empty).collect();
        Self {
            shared: Mutex::new(Shared { run: RunState::Running, mail }),
            changed: Condvar::new(),
            parked: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> RunState {
        self.lock().run
    }

    /// Parks the calling vCPU thread while the state is Paused, answering the requests
    /// its mailbox gets meanwhile. KVM_RUN is not entered while parked, so the vCPU's
    /// state is still.
    fn park_while_paused(&self, vcpu: &mut Vcpu) {
        let mut s = self.lock();
        if s.run != RunState::Paused {
            return;
        }
        // The last exit may have left an MMIO or port read half done (KVM finishes it
        // on the next entry): finish it without running guest code, so the vCPU's
        // registers are final while it is parked.
        vcpu.fd.set_kvm_immediate_exit(1);
        let _ = vcpu.fd.run();
        vcpu.fd.set_kvm_immediate_exit(0);
        self.parked.fetch_add(1, Ordering::SeqCst);
        while s.run == RunState::Paused {
            let slot = usize::from(vcpu.index);
            if let Some(Mail::Capture(support)) = s.mail.get(slot) {
                let captured = VcpuState::capture(&vcpu.fd, support).map_err(|e| format!("vCPU {slot}: {e}"));
                s.mail[slot] = Mail::Captured(Box::new(captured));
                self.changed.notify_all();
                continue;
            }
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long `VcpuSet::capture` waits for the parked threads.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(5);

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The running vCPU threads of a VM.
pub struct VcpuSet {
    threads: Vec<JoinHandle<()>>,
    control: Arc<RunControl>,
}

impl VcpuSet {
    /// Starts one thread per vCPU. Exits the guest causes (reset, triple fault, KVM
    /// errors) are reported on `exits`.
    pub fn start(vcpus: Vec<Vcpu>, pio: Arc<Bus>, mmio: Arc<Bus>, exits: Sender<VmExit>) -> Result<Self, VcpuError> {
        register_signal_handler(SIGRTMIN(), kick_handler).map_err(VcpuError::Signal)?;
        let control = Arc::new(RunControl::new(vcpus.len()));
        let mut threads = Vec::new();
        for vcpu in vcpus {
            let (pio, mmio, exits, control) = (pio.clone(), mmio.clone(), exits.clone(), control.clone());
            let t = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index))
                .stack_size(crate::THREAD_STACK)
                .spawn(move || {
                    // A panicking vCPU thread ends the VM rather than leaving it a vCPU short.
                    let thread = format!("vCPU {}", vcpu.index);
                    crate::panics::report_panics(&thread, &exits, || run_loop(vcpu, &pio, &mmio, &exits, &control))
                })
                .map_err(VcpuError::Spawn)?;
            threads.push(t);
        }
        Ok(Self { threads, control })
    }

    fn kick_all(&self) {
        for t in &self.threads {
            let _ = t.kill(SIGRTMIN());
        }
    }

    /// Stops all vCPUs at their next exit and waits (bounded) until every one is parked.
    pub fn pause(&self) -> bool {
        self.control.lock().run = RunState::Paused;
        // A kick can land just before a thread enters KVM_RUN; kick until all are parked.
        for _ in 0..500 {
            if self.control.parked.load(Ordering::SeqCst) >= self.live_threads() {
                return true;
            }
            self.kick_all();
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    pub fn resume(&self) {
        let mut s = self.control.lock();
        s.run = RunState::Running;
        s.mail.iter_mut().for_each(|m| *m = Mail::Empty);
        drop(s);
        self.control.changed.notify_all();
    }

    /// Every vCPU's state, read by its own thread while it is parked: the VM must be
    /// paused (`pause` returned true) and stays so. Waits at most `CAPTURE_TIMEOUT`.
    pub fn capture(&self, support: &Arc<VcpuStateSupport>) -> Result<Vec<VcpuState>, String> {
        let mut s = self.control.lock();
        if s.run != RunState::Paused || self.control.parked.load(Ordering::SeqCst) < self.threads.len() {
            return Err("the vCPUs are not all paused".into());
        }
        s.mail.iter_mut().for_each(|m| *m = Mail::Capture(support.clone()));
        self.control.changed.notify_all();
        let deadline = std::time::Instant::now() + CAPTURE_TIMEOUT;
        while s.mail.iter().any(|m| !matches!(m, Mail::Captured(_))) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                s.mail.iter_mut().for_each(|m| *m = Mail::Empty);
                return Err(format!("the vCPU threads did not report their state within {CAPTURE_TIMEOUT:?}"));
            }
            s = self.control.changed.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        let empty = (0..s.mail.len()).map(|_| Mail::Empty).collect();
        std::mem::replace(&mut s.mail, empty)
            .into_iter()
            .map(|m| match m {
                Mail::Captured(r) => *r,
                _ => Err("a vCPU thread left its mailbox without an answer".into()),
            })
            .collect()
    }

    pub fn is_paused(&self) -> bool {
        self.control.state() == RunState::Paused
    }

    fn live_threads(&self) -> usize {
        self.threads.iter().filter(|t| !t.is_finished()).count()
    }
}

fn run_loop(mut vcpu: Vcpu, pio: &Bus, mmio: &Bus, exits: &Sender<VmExit>, control: &RunControl) {
    let index = vcpu.index;
    // Before the first KVM_RUN: from here on the guest drives this thread.
    if let Err(e) = crate::seccomp::install_if_enabled(crate::seccomp::ThreadKind::Vcpu) {
        let _ = exits.send(VmExit::Error(format!("vCPU {index}: {e}")));
        return;
    }
    loop {
        control.park_while_paused(&mut vcpu);
        crate::seccomp::selftest_point(crate::seccomp::ThreadKind::Vcpu);
        match vcpu.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                pio.read(u64::from(port), data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
            }
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: where the vCPU was tells a crash from a deliberate reset
                // on Intel; AMD's KVM reinitializes the VMCB first (rip 0xfff0 then).
                let at = match (vcpu.fd.get_regs(), vcpu.fd.get_sregs()) {
                    (Ok(r), Ok(s)) => format!(
                        "vCPU {index}: rip {:#x} rsp {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
                        r.rip, r.rsp, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
                    ),
                    (Err(e), _) | (_, Err(e)) => format!("vCPU {index}: registers unreadable: {e}"),
                };
                let _ = exits.send(VmExit::GuestTripleFault(at));
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                let _ = exits.send(match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::GuestPowerOff,
                    _ => VmExit::GuestReset,
                });
                return;
            }
            Ok(VcpuExit::Hlt) => {
                // Only reachable without the in-kernel LAPIC: the guest halted for good.
                let _ = exits.send(VmExit::GuestPowerOff);
                return;
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                let _ = exits
                    .send(VmExit::Error(format!("vCPU {index}: KVM entry failed (reason {reason:#x}, cpu {cpu})")));
                return;
            }
            Ok(VcpuExit::InternalError) => {
                let _ = exits.send(VmExit::Error(format!(
                    "vCPU {index}: KVM internal error (the guest ran something KVM cannot emulate)"
                )));
                return;
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                log::warn!("vCPU {index}: unexpected KVM exit {other:?}; continuing");
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                let _ = exits.send(VmExit::Error(format!("vCPU {index}: KVM_RUN failed: {e}")));
                return;
            }
        }
    }
}
