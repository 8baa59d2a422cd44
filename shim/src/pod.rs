//! The seam between the task logic (`sandbox.rs`: containerd's task semantics, the
//! process state machine, exit waiters, events) and the pod's micro-VM (`vmpod.rs`: the
//! VMM, the agent connection, the share's mounts, the network, the hooks).
//!
//! The task logic talks to the guest only through `PodEngine` and `GuestPod`, so its
//! rules (exit events, 255 for every process when the VM dies, a failed start waking
//! `Wait`, a failed create unmounting, the VM ending with the last container) are unit
//! tested against a fake (`fakepod.rs`) without KVM or containerd, as runwasi tests its
//! shim against a stub `Instance`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim_protos::api::Mount;
use wisp_config::Config;
use wisp_protocols::agent::StatsContainerResponse;

use crate::io::StdioPaths;
use crate::spec::BundleSpec;

/// A task call's failure, in containerd's classes (`service.rs` maps them to ttrpc codes).
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Internal(String),
}

pub fn internal(e: impl std::fmt::Display) -> TaskError {
    TaskError::Internal(e.to_string())
}

/// Called once, from another thread, when the pod's VM ends by itself (not by
/// `GuestPod::shutdown`), with the reason.
pub type OnVmExit = Box<dyn FnOnce(String) + Send>;

/// What booting a pod's VM needs (known when its first container is created).
pub struct Boot<'a> {
    pub sandbox_id: &'a str,
    /// containerd's namespace (for `binary://` logging programs).
    pub namespace: &'a str,
    pub config: Config,
    /// The first container's spec: the pod's network namespace, hooks, hostname, cgroup.
    pub spec: &'a BundleSpec,
    pub bundle: &'a Path,
}

/// Boots pods' VMs.
pub trait PodEngine: Send + Sync {
    /// Boots the VM and gets its agent ready. On error nothing is left behind.
    fn boot(&self, boot: Boot<'_>, on_exit: OnVmExit) -> Result<Arc<dyn GuestPod>, TaskError>;
}

/// A container's host side: its rootfs and volumes on the share. Dropping it unmounts.
pub trait HostMounts: Send {}

/// A process's stdio copies between containerd's FIFOs and the guest.
pub trait ProcessStdio: Send {
    /// Stdin EOF for the process (CloseIO).
    fn close_stdin(&mut self);
    /// Waits until the process's output reached containerd, at most `timeout`.
    fn wait_output(&mut self, timeout: Duration) -> bool;
}

/// What creating a container needs.
pub struct NewContainer<'a> {
    pub id: &'a str,
    pub spec: &'a BundleSpec,
    pub bundle: &'a Path,
    pub rootfs: &'a [Mount],
    pub stdio: &'a StdioPaths,
}

/// One booted pod VM, as the task logic uses it. Every call may fail with the VM gone.
pub trait GuestPod: Send + Sync {
    /// Mounts the container's rootfs and volumes for the guest and returns them
    /// (dropping the value unmounts), with the spec the guest is to get.
    fn mount_container(&self, c: &NewContainer<'_>) -> Result<(Box<dyn HostMounts>, Vec<u8>), TaskError>;
    /// Creates the container in the guest (not started) from the spec `mount_container` made.
    fn create_container(&self, c: &NewContainer<'_>, guest_spec: Vec<u8>) -> Result<(), TaskError>;
    /// Connects a created process's stdio (before it starts).
    fn attach_stdio(&self, cid: &str, eid: &str, stdio: &StdioPaths) -> Result<Box<dyn ProcessStdio>, TaskError>;
    /// Removes a container from the guest (its processes are killed).
    fn remove_container(&self, cid: &str) -> Result<(), TaskError>;
    /// Starts a created container's init process; returns its pid in the guest.
    fn start_container(&self, cid: &str) -> Result<u32, TaskError>;
    /// Creates and starts an exec (OCI process JSON); returns its pid in the guest.
    fn exec_process(&self, cid: &str, eid: &str, process_json: &[u8], stdio: &StdioPaths)
        -> Result<u32, TaskError>;
    /// Blocks until the process exits; its status, or None when the guest is gone.
    fn wait_process(&self, cid: &str, eid: &str) -> Option<u32>;
    fn signal_process(&self, cid: &str, eid: &str, signal: u32, all: bool) -> Result<(), TaskError>;
    fn pause_container(&self, cid: &str) -> Result<(), TaskError>;
    fn resume_container(&self, cid: &str) -> Result<(), TaskError>;
    fn list_processes(&self, cid: &str) -> Result<Vec<u32>, TaskError>;
    fn stats_container(&self, cid: &str) -> Result<StatsContainerResponse, TaskError>;
    fn update_container(&self, cid: &str, resources_json: Vec<u8>) -> Result<(), TaskError>;
    fn resize_pty(&self, cid: &str, eid: &str, width: u32, height: u32) -> Result<(), TaskError>;
    /// Blocks until the guest reports an OOM kill; the container id it names (the
    /// guest's word: unchecked), or None when the guest is gone.
    fn next_oom_event(&self) -> Option<String>;
    /// Ends the guest and the VM and removes everything the pod had on the host.
    fn shutdown(&self);
}
