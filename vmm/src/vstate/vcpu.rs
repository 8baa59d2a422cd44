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

/// Shared by the VMM and all vCPU threads: the requested run state and how many
/// vCPUs are currently parked in the paused state.
pub struct RunControl {
    state: Mutex<RunState>,
    changed: Condvar,
    parked: AtomicUsize,
}

impl RunControl {
    fn new() -> Self {
        Self { state: Mutex::new(RunState::Running), changed: Condvar::new(), parked: AtomicUsize::new(0) }
    }

    fn state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks the calling vCPU thread while the state is Paused.
    fn park_while_paused(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if *s != RunState::Paused {
            return;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        while *s == RunState::Paused {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }
}

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
        let control = Arc::new(RunControl::new());
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
        *self.control.state.lock().unwrap_or_else(|e| e.into_inner()) = RunState::Paused;
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
        *self.control.state.lock().unwrap_or_else(|e| e.into_inner()) = RunState::Running;
        self.control.changed.notify_all();
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
        control.park_while_paused();
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
