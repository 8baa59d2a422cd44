//! The control API (`--api-sock`): a ttrpc service on a Unix socket, defined in
//! `protocols/proto/vmm.proto`. Only the host side (the shim, an operator) can reach
//! it; requests are still validated (an absurd grace period is capped).

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use wisp_protocols::vmm::{BootTimelineResponse, Empty, Milestone, ShutdownRequest, SnapshotRequest, StateResponse};
use wisp_protocols::vmm_ttrpc::{create_vmm, Vmm};

use crate::devices::legacy::BootTimeline;
use crate::vstate::vcpu::VcpuSet;
use crate::VmExit;

/// The longest grace period Shutdown accepts.
const MAX_GRACE: Duration = Duration::from_secs(600);

/// What the control API may touch of a running VM.
#[derive(Clone)]
pub struct VmControl {
    pub vcpus: Arc<VcpuSet>,
    pub timeline: BootTimeline,
    pub exits: Sender<VmExit>,
    pub vcpu_count: u8,
    pub memory_bytes: u64,
    pub snapshots: crate::builder::Snapshotter,
}

struct Service {
    vm: VmControl,
    exits: std::sync::Mutex<Sender<VmExit>>,
}

fn rpc_error(msg: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::FAILED_PRECONDITION, msg))
}

fn invalid(msg: String) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::INVALID_ARGUMENT, msg))
}

impl Vmm for Service {
    fn state(&self, _: &ttrpc::TtrpcContext, _: Empty) -> ttrpc::Result<StateResponse> {
        Ok(StateResponse {
            state: if self.vm.vcpus.is_paused() { "paused" } else { "running" }.into(),
            vcpus: u32::from(self.vm.vcpu_count),
            memory_bytes: self.vm.memory_bytes,
            pid: std::process::id(),
            ..Default::default()
        })
    }

    fn pause(&self, _: &ttrpc::TtrpcContext, _: Empty) -> ttrpc::Result<Empty> {
        if self.vm.vcpus.pause() {
            Ok(Empty::default())
        } else {
            self.vm.vcpus.resume();
            Err(rpc_error("vCPUs did not stop within 1 s; the VM keeps running".into()))
        }
    }

    fn resume(&self, _: &ttrpc::TtrpcContext, _: Empty) -> ttrpc::Result<Empty> {
        self.vm.vcpus.resume();
        Ok(Empty::default())
    }

    fn shutdown(&self, _: &ttrpc::TtrpcContext, req: ShutdownRequest) -> ttrpc::Result<Empty> {
        let grace = Duration::from_millis(u64::from(req.grace_ms)).min(MAX_GRACE);
        let exits = self.exits.lock().map_err(|_| rpc_error("VMM state poisoned".into()))?.clone();
        // A paused guest cannot end by itself: let it run out its grace period.
        self.vm.vcpus.resume();
        std::thread::spawn(move || {
            std::thread::sleep(grace);
            let _ = exits.send(VmExit::Stopped(format!("control API shutdown after {} ms grace", grace.as_millis())));
        });
        Ok(Empty::default())
    }

    fn snapshot(&self, _: &ttrpc::TtrpcContext, req: SnapshotRequest) -> ttrpc::Result<Empty> {
        let (state, memory) = snapshot_paths(&req).map_err(invalid)?;
        self.vm.snapshots.take(&state, &memory).map_err(|e| rpc_error(format!("Snapshot: {e}")))?;
        Ok(Empty::default())
    }

    fn boot_timeline(&self, _: &ttrpc::TtrpcContext, _: Empty) -> ttrpc::Result<BootTimelineResponse> {
        let milestones = self
            .vm
            .timeline
            .marks()
            .into_iter()
            .map(|(m, at)| Milestone { name: m.name(), at_us: at.as_micros() as u64, ..Default::default() })
            .collect();
        Ok(BootTimelineResponse { milestones, ..Default::default() })
    }
}

/// A Snapshot request's two paths: each non-empty, without NUL, absolute (the VMM's
/// working directory is nobody's business), and not the same file.
fn snapshot_paths(req: &SnapshotRequest) -> Result<(PathBuf, PathBuf), String> {
    let path = |p: &str, what: &str| {
        if p.is_empty() || p.contains('\0') || !p.starts_with('/') {
            return Err(format!("Snapshot: {what} {p:?} is not an absolute path"));
        }
        Ok(PathBuf::from(p))
    };
    let state = path(&req.state_path, "state_path")?;
    let memory = path(&req.memory_path, "memory_path")?;
    if state == memory {
        return Err("Snapshot: state_path and memory_path must differ".into());
    }
    Ok((state, memory))
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(String),
    #[error("removing stale socket {path}: {source}")]
    Stale { path: String, source: std::io::Error },
    #[error("ttrpc server: {0}")]
    Ttrpc(#[from] ttrpc::Error),
}

/// Starts serving; the server stops when the returned value is dropped.
pub fn serve(path: &Path, vm: VmControl) -> Result<ttrpc::Server, ApiError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(ApiError::NotASocket(path.display().to_string()));
        }
        std::fs::remove_file(path).map_err(|source| ApiError::Stale { path: path.display().to_string(), source })?;
    }
    let exits = std::sync::Mutex::new(vm.exits.clone());
    let service = Arc::new(Service { vm, exits });
    let mut server =
        ttrpc::Server::new().bind(&format!("unix://{}", path.display()))?.register_service(create_vmm(service));
    server.start()?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_request_needs_two_distinct_absolute_paths() {
        let req =
            |s: &str, m: &str| SnapshotRequest { state_path: s.into(), memory_path: m.into(), ..Default::default() };
        assert_eq!(snapshot_paths(&req("/t/vm.snap", "/t/vm.mem")), Ok(("/t/vm.snap".into(), "/t/vm.mem".into())));
        for (s, m, want) in [
            ("", "/t/m", "state_path \"\" is not an absolute path"),
            ("/t/s", "", "memory_path \"\" is not an absolute path"),
            ("vm.snap", "/t/m", "state_path \"vm.snap\" is not an absolute path"),
            ("/t/s\0x", "/t/m", "state_path"),
            ("/t/same", "/t/same", "must differ"),
        ] {
            let e = snapshot_paths(&req(s, m)).unwrap_err();
            assert!(e.starts_with("Snapshot: ") && e.contains(want), "{s:?} {m:?}: {e}");
        }
    }
}
