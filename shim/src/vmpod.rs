//! A pod's micro-VM, the real `GuestPod`: wisp-vmm (`vm.rs`), the agent connection
//! (`agent.rs`), the share and each container's mounts on it (`share.rs`, `mounts.rs`),
//! the pod network (`network/`) and the spec's host-side hooks (`hooks.rs`).
//!
//! Boot order: the state directory (0700), the share, the hooks (they may make the
//! network namespace), the network, the VMM, the agent, the sandbox in the guest, the
//! guest's interfaces and routes. A failure at any step undoes the steps before it
//! (`Booting`). Shutdown: the guest is asked to end, the VMM stopped, then the network,
//! the hooks' poststop, the share and the state directory go.

use std::os::unix::fs::DirBuilderExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use wisp_protocols::agent;

use crate::agent::{call_error, task_error, Agent};
use crate::hooks::PodHooks;
use crate::io::{ProcessIo, StdioPaths};
use crate::mounts::ContainerMounts;
use crate::network::PodNetwork;
use crate::pod::{internal, Boot, GuestPod, HostMounts, NewContainer, OnVmExit, PodEngine, ProcessStdio, TaskError};
use crate::share::Share;
use crate::spec::GUEST_SHARED_DIR;
use crate::vm::{SandboxPaths, VmmProcess};
use crate::vmstart::{NicMacs, VmSlot, VmStart};

/// The virtio-fs tag of the shared directory.
pub const SHARED_FS_TAG: &str = "wisp";
/// How long the guest may take to remove a container (its processes are killed).
const REMOVE_TIMEOUT_MS: u32 = 10_000;
/// How much of the guest console an unexpected VM end copies into the shim's log.
const CONSOLE_TAIL_LINES: usize = 40;
/// Of which at most this many bytes (read from the file's end).
const CONSOLE_TAIL_BYTES: u64 = 16 << 10;

/// Boots pods as wisp-vmm micro-VMs.
pub struct VmEngine;

impl PodEngine for VmEngine {
    fn boot(&self, boot: Boot<'_>, on_exit: OnVmExit) -> Result<Arc<dyn GuestPod>, TaskError> {
        Ok(Arc::new(VmPod::boot(boot, on_exit)?))
    }
}

/// A booted pod VM with its agent.
pub struct VmPod {
    sandbox_id: String,
    namespace: String,
    vm: Arc<VmmProcess>,
    agent: Arc<Agent>,
    paths: SandboxPaths,
    grace: Duration,
    /// The share's skeleton and the guest's read-only view of it; None once shut down.
    share: Mutex<Option<Arc<Share>>>,
    /// What `shutdown` takes down after the VMM: the taps and tc plumbing in the pod's
    /// network namespace, and the spec's hooks (`poststop`) with the namespace the shim
    /// made for them. None once shut down.
    after_vm: Mutex<Option<(Option<PodNetwork>, Option<PodHooks>)>>,
    /// Set by `shutdown` before it stops the VMM: that end is not the VM's own.
    stopping: Arc<AtomicBool>,
    /// Set once the guest console's tail went into the log.
    tail_logged: Arc<AtomicBool>,
}

/// What `VmPod::boot` has set up so far. Dropped before `finish`, it undoes all of it:
/// stops the VMM, then tears the pod network down, then removes the state directory.
struct Booting {
    paths: SandboxPaths,
    net: Option<PodNetwork>,
    hooks: Option<PodHooks>,
    vm: VmSlot,
    armed: bool,
}

impl Booting {
    /// Boot succeeded: nothing is undone; the network and hooks are the pod's now.
    fn finish(mut self) -> (Option<PodNetwork>, Option<PodHooks>) {
        self.armed = false;
        (self.net.take(), self.hooks.take())
    }
}

impl Drop for Booting {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some((vm, _)) = self.vm.take() {
            vm.stop(Duration::ZERO);
        }
        if let Some(mut net) = self.net.take() {
            net.teardown();
        }
        if let Some(h) = self.hooks.take() {
            h.finish();
        }
        crate::cleanup::remove_state_dir(&self.paths.dir);
    }
}

impl VmPod {
    fn boot(boot: Boot<'_>, on_exit: OnVmExit) -> Result<Self, TaskError> {
        let Boot { sandbox_id, namespace, config, spec, bundle } = boot;
        let mut netns = spec.netns.clone();
        let hooks = spec.hooks.clone();
        let paths = SandboxPaths::new(&config.runtime.state_dir, sandbox_id);
        if paths.dir.exists() {
            return Err(TaskError::AlreadyExists(format!(
                "{} exists: another wisp sandbox with id {sandbox_id} is running or was not cleaned up",
                paths.dir.display(),
            )));
        }
        // The state root and the sandbox's directory are root's alone (0700): below
        // them are the guest's files, setuid ones included, and the pod's volumes.
        if let Some(root) = paths.dir.parent() {
            crate::hostfs::create_dir_all_mode(root, 0o700).map_err(internal)?;
        }
        std::fs::DirBuilder::new().mode(0o700).create(&paths.dir).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                TaskError::AlreadyExists(format!(
                    "{} exists: another wisp sandbox with id {sandbox_id} is running",
                    paths.dir.display(),
                ))
            } else {
                internal(format!("creating {}: {e}", paths.dir.display()))
            }
        })?;
        // From here on, dropping `b` undoes everything done so far.
        let mut b = Booting { paths: paths.clone(), net: None, hooks: None, vm: None, armed: true };
        let share = Arc::new(Share::create(&paths.dir).map_err(|e| internal(format!("setting up the share: {e}")))?);
        if !hooks.is_empty() {
            // A fresh network namespace is made here only for hooks to set up (nerdctl's
            // CNI); without hooks such a pod has loopback only, as before.
            let netns_at = netns.is_none().then(|| paths.dir.join("netns"));
            let h = PodHooks::start(hooks, sandbox_id, bundle, &spec.json, netns_at.as_deref())
                .map_err(|e| internal(format!("running the spec's hooks: {e}")))?;
            if let Some(ns) = h.netns() {
                netns = Some(ns.to_path_buf());
            }
            b.hooks = Some(h);
        }
        if let Some(netns) = &netns {
            b.net = Some(PodNetwork::setup(netns).map_err(|e| internal(format!("setting up the pod network: {e}")))?);
        }
        let stopping = Arc::new(AtomicBool::new(false));
        let tail_logged = Arc::new(AtomicBool::new(false));
        let on_exit = {
            let (stopping, tail_logged, paths, id) =
                (stopping.clone(), tail_logged.clone(), paths.clone(), sandbox_id.to_string());
            Box::new(move |why: String| {
                if stopping.load(Ordering::Acquire) {
                    return;
                }
                log::warn!("sandbox {id}: the VM ended: {why}");
                // With `debug` on, the guest's last console lines say why (panic, reset),
                // and the state directory holding them goes with the pod: keep them.
                if let Some(tail) = console_tail(&paths) {
                    log::warn!("sandbox {id}: last guest console lines:\n{tail}");
                }
                tail_logged.store(true, Ordering::Release);
                on_exit(why);
            })
        };
        if !config.hypervisor.seccomp {
            log::warn!(
                "sandbox {sandbox_id}: hypervisor.seccomp is off: wisp-vmm's threads have no seccomp filter \
                 (for debugging only)"
            );
        }
        if !config.hypervisor.jail {
            log::warn!(
                "sandbox {sandbox_id}: hypervisor.jail is off: wisp-vmm runs unconfined, as root in the host's \
                 namespaces (for debugging only)"
            );
        }
        let devices = b.net.as_ref().map(PodNetwork::vmm_devices).unwrap_or_default();
        let start = VmStart {
            config: &config,
            paths: &paths,
            devices: &devices,
            cgroups_path: spec.cgroups_path.as_deref(),
            sandbox_id,
            on_exit: Arc::new(Mutex::new(Some(on_exit))),
        };
        let (vm, agent, nic_macs) = start.run(&mut b.vm)?;
        drop(devices);
        let agent = Arc::new(agent);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let req = agent::CreateSandboxRequest {
            sandbox_id: sandbox_id.into(),
            hostname: spec.hostname.clone(),
            shared_fs_tag: SHARED_FS_TAG.into(),
            shared_fs_mount_point: GUEST_SHARED_DIR.into(),
            guest_time_unix_sec: now.as_secs() as i64,
            guest_time_nsec: now.subsec_nanos(),
            entropy: host_entropy().map_err(|e| internal(format!("reading host entropy for the guest: {e}")))?,
            ..Default::default()
        };
        agent.client.create_sandbox(agent.ctx(), &req).map_err(|e| task_error("CreateSandbox", e))?;
        if let Some(net) = &b.net {
            configure_guest_network(&agent, net, &nic_macs)?;
        }
        let after_vm = b.finish();
        Ok(Self {
            sandbox_id: sandbox_id.into(),
            namespace: namespace.into(),
            vm,
            agent,
            paths,
            grace: config.runtime.shutdown_grace(),
            share: Mutex::new(Some(share)),
            after_vm: Mutex::new(Some(after_vm)),
            stopping,
            tail_logged,
        })
    }

    fn container_request(cid: &str) -> agent::ContainerRequest {
        agent::ContainerRequest { container_id: cid.into(), ..Default::default() }
    }
}

impl HostMounts for ContainerMounts {}

impl ProcessStdio for ProcessIo {
    fn close_stdin(&mut self) {
        ProcessIo::close_stdin(self)
    }

    fn wait_output(&mut self, timeout: Duration) -> bool {
        ProcessIo::wait_output(self, timeout)
    }
}

impl GuestPod for VmPod {
    fn mount_container(&self, c: &NewContainer<'_>) -> Result<(Box<dyn HostMounts>, Vec<u8>), TaskError> {
        let share = self.share.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let share = share.ok_or_else(|| TaskError::FailedPrecondition("the pod's VM is shut down".into()))?;
        let mut mounts = ContainerMounts::new(share, c.id);
        mounts.mount_rootfs(c.rootfs, &c.spec.root_path(c.bundle)).map_err(internal)?;
        let submounts = mounts.mount_binds(&c.spec.binds).map_err(internal)?;
        let guest_spec = serde_json::to_vec(&c.spec.for_guest(c.id, &submounts)).map_err(internal)?;
        Ok((Box::new(mounts), guest_spec))
    }

    fn create_container(&self, c: &NewContainer<'_>, guest_spec: Vec<u8>) -> Result<(), TaskError> {
        let req = agent::CreateContainerRequest {
            container_id: c.id.into(),
            oci_spec_json: guest_spec,
            stdio: protobuf::MessageField::some(c.stdio.spec()),
            sandbox_container: c.spec.is_sandbox_container(),
            ..Default::default()
        };
        self.agent.client.create_container(self.agent.ctx(), &req).map_err(|e| task_error("CreateContainer", e))?;
        Ok(())
    }

    fn attach_stdio(&self, cid: &str, eid: &str, stdio: &StdioPaths) -> Result<Box<dyn ProcessStdio>, TaskError> {
        let io = ProcessIo::attach(&self.paths.vsock(), cid, eid, stdio, &self.namespace).map_err(internal)?;
        Ok(Box::new(io))
    }

    fn remove_container(&self, cid: &str) -> Result<(), TaskError> {
        let req = agent::RemoveContainerRequest {
            container_id: cid.into(),
            timeout_ms: REMOVE_TIMEOUT_MS,
            ..Default::default()
        };
        self.agent.client.remove_container(self.agent.ctx(), &req).map_err(|e| task_error("RemoveContainer", e))?;
        Ok(())
    }

    fn start_container(&self, cid: &str) -> Result<u32, TaskError> {
        let req = Self::container_request(cid);
        let resp = self.agent.client.start_container(self.agent.ctx(), &req);
        Ok(resp.map_err(|e| task_error("StartContainer", e))?.pid)
    }

    fn exec_process(&self, cid: &str, eid: &str, process_json: &[u8], stdio: &StdioPaths) -> Result<u32, TaskError> {
        let req = agent::ExecProcessRequest {
            container_id: cid.into(),
            exec_id: eid.into(),
            process_json: process_json.to_vec(),
            stdio: protobuf::MessageField::some(stdio.spec()),
            ..Default::default()
        };
        let resp = self.agent.client.exec_process(self.agent.ctx(), &req);
        Ok(resp.map_err(|e| task_error("ExecProcess", e))?.pid)
    }

    fn wait_process(&self, cid: &str, eid: &str) -> Option<u32> {
        let req = agent::ProcessRequest { container_id: cid.into(), exec_id: eid.into(), ..Default::default() };
        match self.agent.client.wait_process(self.agent.long_poll_ctx(), &req) {
            Ok(r) => Some(r.exit_status as u32),
            Err(e) => {
                log::warn!("waiting for {cid}/{eid}: {}", call_error("WaitProcess", e));
                None
            }
        }
    }

    fn signal_process(&self, cid: &str, eid: &str, signal: u32, all: bool) -> Result<(), TaskError> {
        let req = agent::SignalProcessRequest {
            container_id: cid.into(),
            exec_id: eid.into(),
            signal,
            all,
            ..Default::default()
        };
        self.agent.client.signal_process(self.agent.ctx(), &req).map_err(|e| task_error("SignalProcess", e))?;
        Ok(())
    }

    fn pause_container(&self, cid: &str) -> Result<(), TaskError> {
        let req = Self::container_request(cid);
        self.agent.client.pause_container(self.agent.ctx(), &req).map_err(|e| task_error("PauseContainer", e))?;
        Ok(())
    }

    fn resume_container(&self, cid: &str) -> Result<(), TaskError> {
        let req = Self::container_request(cid);
        self.agent.client.resume_container(self.agent.ctx(), &req).map_err(|e| task_error("ResumeContainer", e))?;
        Ok(())
    }

    fn list_processes(&self, cid: &str) -> Result<Vec<u32>, TaskError> {
        let req = Self::container_request(cid);
        let resp = self.agent.client.list_processes(self.agent.ctx(), &req);
        Ok(resp.map_err(|e| task_error("ListProcesses", e))?.pids)
    }

    fn stats_container(&self, cid: &str) -> Result<agent::StatsContainerResponse, TaskError> {
        let req = Self::container_request(cid);
        self.agent.client.stats_container(self.agent.ctx(), &req).map_err(|e| task_error("StatsContainer", e))
    }

    fn update_container(&self, cid: &str, resources_json: Vec<u8>) -> Result<(), TaskError> {
        let req = agent::UpdateContainerRequest { container_id: cid.into(), resources_json, ..Default::default() };
        self.agent.client.update_container(self.agent.ctx(), &req).map_err(|e| task_error("UpdateContainer", e))?;
        Ok(())
    }

    fn resize_pty(&self, cid: &str, eid: &str, width: u32, height: u32) -> Result<(), TaskError> {
        let req = agent::TtyWinResizeRequest {
            container_id: cid.into(),
            exec_id: eid.into(),
            rows: height,
            cols: width,
            ..Default::default()
        };
        self.agent.client.tty_win_resize(self.agent.ctx(), &req).map_err(|e| task_error("TtyWinResize", e))?;
        Ok(())
    }

    fn next_oom_event(&self) -> Option<String> {
        let ev = self.agent.client.get_oom_event(self.agent.long_poll_ctx(), &agent::Empty::new()).ok()?;
        Some(ev.container_id)
    }

    /// Asks the agent to end the guest, stops the VMM, then takes the network, the
    /// hooks, the share and the state directory down. Only the first call does anything.
    fn shutdown(&self) {
        let Some((net, hooks)) = self.after_vm.lock().unwrap_or_else(|e| e.into_inner()).take() else { return };
        // A VMM that is already gone, or an agent that no longer answers, means the
        // guest ended by itself (panic, reset): its console says why (the exit callback
        // logged it if it came first).
        let unexpected = self.vm.exited().is_some()
            || self.agent.client.destroy_sandbox(self.agent.ctx(), &agent::Empty::new()).is_err();
        self.stopping.store(true, Ordering::Release);
        self.vm.stop(self.grace);
        if unexpected && !self.tail_logged.load(Ordering::Acquire) {
            if let Some(tail) = console_tail(&self.paths) {
                log::warn!(
                    "sandbox {}: the guest ended on its own; last guest console lines:\n{tail}",
                    self.sandbox_id
                );
            }
        }
        // After the VMM, which holds the taps, is gone.
        if let Some(mut net) = net {
            net.teardown();
        }
        // poststop (CNI DEL for nerdctl) after our plumbing left the namespace.
        if let Some(h) = hooks {
            h.finish();
        }
        // Our fds on the share go first, so its view unmounts without a lazy detach.
        drop(self.share.lock().unwrap_or_else(|e| e.into_inner()).take());
        crate::cleanup::remove_state_dir(&self.paths.dir);
    }
}

/// How many random bytes the guest gets from the host at CreateSandbox.
const GUEST_ENTROPY_BYTES: usize = 64;

/// Fresh random bytes for the guest's entropy pool (the kernel's, through /dev/urandom:
/// it never blocks once the host has booted).
fn host_entropy() -> std::io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; GUEST_ENTROPY_BYTES];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes)
}

/// The guest console's last lines (written only with `debug` on; the guest's text: read
/// from the end of the file only, control characters replaced).
pub(crate) fn console_tail(paths: &SandboxPaths) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(paths.console()).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(CONSOLE_TAIL_BYTES))).ok()?;
    let mut bytes = Vec::new();
    f.take(CONSOLE_TAIL_BYTES).read_to_end(&mut bytes).ok()?;
    let text = crate::bounds::guest_text(&String::from_utf8_lossy(&bytes), CONSOLE_TAIL_BYTES as usize * 3, true);
    let lines: Vec<&str> = text.lines().collect();
    Some(lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n"))
}

/// Gives the guest the pod's interfaces (matched by MAC: the VMM gave each NIC its
/// interface's MAC, or a template's, which `nic_macs` maps the interface's to) and then
/// its routes.
fn configure_guest_network(agent: &Agent, net: &PodNetwork, nic_macs: &NicMacs) -> Result<(), TaskError> {
    for mut iface in net.interfaces() {
        if let Some(device_mac) = nic_macs.device_mac(&iface.mac) {
            iface.device_mac = device_mac;
        }
        let what = format!("configuring the guest's {} ({})", iface.name, iface.mac);
        let interface = protobuf::MessageField::some(iface);
        let req = agent::UpdateInterfaceRequest { interface, ..Default::default() };
        if let Err(e) = agent.client.update_interface(agent.ctx(), &req) {
            return Err(internal(format!("{what}: {}", call_error("UpdateInterface", e))));
        }
    }
    let routes = net.routes();
    if !routes.is_empty() {
        let what = format!("adding the pod's {} routes in the guest", routes.len());
        let req = agent::UpdateRoutesRequest { routes, ..Default::default() };
        if let Err(e) = agent.client.update_routes(agent.ctx(), &req) {
            return Err(internal(format!("{what}: {}", call_error("UpdateRoutes", e))));
        }
    }
    Ok(())
}
