//! wisp-vmm: a virtual machine monitor for one pod's micro-VM, on the rust-vmm crates.
//!
//! The guest is untrusted: everything read from guest memory or guest-written registers
//! is validated before use, and a misbehaving guest can at worst stop its own VM.
//!
//! Threads: one per vCPU (`vstate::vcpu`), one device thread running the event loop
//! every virtio device is driven from, and the caller's thread, which waits for the VM
//! to end (`MicroVm::wait`).

pub mod api;
pub mod arch;
pub mod builder;
pub mod devices;
pub mod jail;
pub mod logger;
pub mod panics;
pub mod seccomp;
pub mod snapshot;
pub mod vstate;

pub use builder::{ConsoleOutput, DiskConfig, MicroVm, StartError, VmConfig, VsockConfig};

/// Stack size of the VMM's own threads: small, so that no stack is ever backed by a
/// 2 MiB transparent huge page (the default 2 MiB stacks sometimes are), which would
/// count against the VMM's footprint.
pub const THREAD_STACK: usize = 1024 * 1024;

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest rebooted through the i8042 reset line: the normal way a wisp guest ends
    /// (it boots with `reboot=k`, and `panic=-1` reboots after a panic).
    GuestReset,
    /// A vCPU triple-faulted (KVM's shutdown exit): the guest crashed without a panic
    /// message, or rebooted the hard way. Says which vCPU and where it was.
    GuestTripleFault(String),
    /// The guest powered off.
    GuestPowerOff,
    /// The VMM was asked to stop (signal or control API).
    Stopped(String),
    /// Something failed; the message says what.
    Error(String),
    /// A VM thread (the device thread, a vCPU) panicked (`panics::report_panics`): the
    /// VM cannot go on without it.
    ThreadPanicked { thread: String, message: String },
}

impl VmExit {
    /// The process exit status for this end: 0 when the guest ended the VM (a triple fault
    /// included) or the VMM was told to stop, 1 for an error or a panicked thread.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::GuestReset | VmExit::GuestPowerOff | VmExit::GuestTripleFault(_) => 0,
            VmExit::Stopped(_) => 0,
            VmExit::Error(_) | VmExit::ThreadPanicked { .. } => 1,
        }
    }

    /// For an end with status 1: the one-line reason the VMM prints on stderr.
    pub fn failure(&self) -> Option<String> {
        match self {
            VmExit::Error(msg) => Some(msg.clone()),
            VmExit::ThreadPanicked { thread, message } => Some(format!("the {thread} thread panicked: {message}")),
            _ => None,
        }
    }
}
