//! Snapshots of a running `MicroVm`: taking one (`Snapshotter::take`, the control
//! API's Snapshot) and opening one to restore (`open`, then `MicroVm::restore`), and the
//! configuration identity both sides compare (`vm_identity`).
//!
//! Taking one, the VM paused: the device thread is stopped between two turns of its
//! event loop (`devices::gate`), each vCPU thread, parked, reads its own vCPU's state
//! (`VcpuSet::capture`), then the VM's in-kernel devices and clock, every virtio-mmio
//! transport (refused, saying why, while a device model holds state a snapshot does not
//! carry: `VirtioDevice::queue_positions`), the serial UART, guest memory to its memory
//! file and last the state file. The device thread goes on afterwards; the vCPUs stay
//! paused until resumed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::legacy::LegacyState;
use super::memory::{map_memory, save_memory, MemoryFileError};
use super::{Header, Snapshot, SnapshotError, VmIdentity};
use crate::builder::{ConsoleOutput, Restore, Snapshotter, VmConfig};

/// How long the device thread may take to finish its turn and park.
const DEVICE_STOP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error("the VM is running: pause it first")]
    NotPaused,
    #[error("this host's KVM cannot save vCPU state: {0}")]
    Unsupported(String),
    #[error("the device thread did not stop within {DEVICE_STOP_TIMEOUT:?}")]
    DevicesBusy,
    #[error("saving the vCPUs: {0}")]
    Vcpus(String),
    #[error("saving the VM's interrupt controllers and clock: {0}")]
    Vm(#[from] super::VmStateError),
    #[error("saving device {index}: {source}")]
    Device { index: usize, source: crate::devices::virtio::mmio::TransportStateError },
    #[error("saving guest memory: {0}")]
    Memory(#[from] MemoryFileError),
    #[error("describing this host: {0}")]
    Host(std::io::Error),
    #[error(transparent)]
    File(#[from] SnapshotError),
}

/// The VM's configuration as a snapshot's header records it and a restore compares it:
/// everything the guest saw (vCPUs, memory, which devices in which order with what
/// guest-visible settings, whether it has a console), nothing of the host ends a
/// restore binds anew (tap, vsock socket path, shared directory path, disk path).
pub fn vm_identity(config: &VmConfig) -> VmIdentity {
    let mut items: Vec<(String, String)> = vec![
        ("vcpus".into(), config.vcpus.to_string()),
        ("memory_mib".into(), config.memory_mib.to_string()),
        ("console".into(), (config.console != ConsoleOutput::Off).to_string()),
        ("rng".into(), config.rng.to_string()),
    ];
    for (i, d) in config.disks.iter().enumerate() {
        items.push((format!("disk{i}"), if d.read_only { "read-only" } else { "read-write" }.into()));
    }
    if let Some(v) = &config.vsock {
        items.push(("vsock".into(), format!("cid {}", v.guest_cid)));
    }
    for (i, s) in config.shared_dirs.iter().enumerate() {
        items.push((format!("fs{i}"), format!("tag {} queues {}", s.tag, s.request_queues)));
    }
    for (i, n) in config.nets.iter().enumerate() {
        let mac = crate::devices::virtio::net::MacAddr(n.mac);
        items.push((format!("net{i}"), format!("mac {mac} mtu {}", n.mtu.unwrap_or(0))));
    }
    // At most 4 + 2 * 32 items of short keys and values: within every bound.
    VmIdentity::new(items).expect("a VM configuration's identity is within the header's bounds")
}

/// Reads the state file at `state` (a damaged one is refused) and maps the memory file
/// at `memory` it names, for `MicroVm::restore` (which checks the header against this
/// host and the configuration).
pub fn open(state: &Path, memory: &Path) -> Result<Restore, SnapshotError> {
    let snapshot = Snapshot::read(state)?;
    let memory = map_memory(memory, &snapshot.memory)
        .map_err(|source| SnapshotError::Memory { path: memory.to_path_buf(), source })?;
    Ok(Restore { snapshot, memory })
}

impl Snapshotter {
    /// Saves the paused VM: its state to `state`, its guest memory to `memory` (each
    /// written to a temporary beside it and renamed into place). The vCPUs stay paused.
    pub fn take(&self, state: &Path, memory: &Path) -> Result<(), TakeError> {
        if !self.vcpus.is_paused() {
            return Err(TakeError::NotPaused);
        }
        let support = self.vcpu_support.clone().map_err(TakeError::Unsupported)?;
        if !self.devices.stop(DEVICE_STOP_TIMEOUT) {
            return Err(TakeError::DevicesBusy);
        }
        let result = self.save_stopped(&support, state, memory);
        self.devices.go();
        result
    }

    fn save_stopped(
        &self,
        support: &Arc<super::VcpuStateSupport>,
        state: &Path,
        memory: &Path,
    ) -> Result<(), TakeError> {
        let vcpus = self.vcpus.capture(support).map_err(TakeError::Vcpus)?;
        let vm = super::VmState::capture(&self.vm.fd)?;
        let devices = self
            .transports
            .iter()
            .enumerate()
            .map(|(index, t)| {
                t.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .save_state()
                    .map_err(|source| TakeError::Device { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let serial = self.console.lock().unwrap_or_else(|e| e.into_inner()).save_state();
        let header = Header::this_host(&self.vm.supported_cpuid, self.vm.tsc_deadline, self.identity.clone())
            .map_err(TakeError::Host)?;
        let memory = save_memory(&self.vm.mem, memory)?;
        let legacy = LegacyState { serial: Some(serial) };
        Snapshot { header, vm, memory, vcpus, devices, legacy }.save(state)?;
        Ok(())
    }
}
