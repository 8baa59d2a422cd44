//! The shim v2 binary protocol: `start` (group containers into their pod's shim),
//! `delete` (clean up after a shim that died), and serving the task API.

use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, Flags, StartOpts};

use crate::container::ExitCell;
use crate::events::RemoteEvents;
use crate::events::timestamp;
use crate::sandbox::Sandbox;
use crate::vmpod::VmEngine;
use crate::service::TaskService;
use crate::spec::BundleSpec;

pub const RUNTIME_ID: &str = "io.containerd.wisp.v2";

pub struct WispShim {
    id: String,
    namespace: String,
    done: Arc<ExitCell>,
}

/// containerd runs `start` and `delete` in the bundle directory.
fn sandbox_id_from_bundle(id: &str) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|b| BundleSpec::load(&b).ok())
        .map(|s| s.sandbox_id(id))
        .unwrap_or_else(|| id.to_string())
}

fn state_dir() -> PathBuf {
    wisp_config::Config::load(None).map(|c| c.runtime.state_dir.clone()).unwrap_or_else(|_| PathBuf::from("/run/wisp"))
}

impl containerd_shim::Shim for WispShim {
    type T = TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Self { id: args.id.clone(), namespace: args.namespace.clone(), done: Arc::default() }
    }

    fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = sandbox_id_from_bundle(&opts.id);
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let sid = sandbox_id_from_bundle(&self.id);
        let dir = state_dir().join(&sid);
        // containerd 1.6 runs `delete` for every task whose connection closed, also
        // right after a normal Delete ("shim disconnected"). Only the sandbox container's
        // own delete may clean up the pod: a member's must not tear down the VM that the
        // live shim still runs the pod's other containers in.
        if sid == self.id && dir.exists() {
            log::warn!("cleaning up after a dead shim: {}", dir.display());
            crate::cleanup::cleanup_sandbox_dir(&dir);
        }
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: protobuf::MessageField::some(timestamp(std::time::SystemTime::now())),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.done.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let events = Arc::new(RemoteEvents::new(publisher, &self.namespace));
        TaskService { sandbox: Sandbox::new(&self.id, &self.namespace, events, self.done.clone(), Arc::new(VmEngine)) }
    }
}
