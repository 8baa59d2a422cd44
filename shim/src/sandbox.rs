//! One pod's micro-VM and everything the shim tracks for it: the VMM process, the agent
//! connection, the shared directory and the containers. The task service is a thin
//! layer over these operations.
//!
//! Failure rules: every step of Create that fails undoes the steps before it (mounts,
//! the container in the guest, and the VM itself if this container started it); a VM
//! that dies turns every live process into an exit with status 255, so no Wait hangs;
//! the last container's Delete tears the VM down and removes `/run/wisp/<id>/`.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use containerd_shim_protos::api::Mount;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim_protos::topics;
use wisp_config::Config;
use wisp_protocols::agent;

use crate::agent::{call_error, task_error, Agent};
use crate::container::{Action, Container, Exit, Process, Status};
use crate::events::EventSink;
use crate::hooks::{Hooks, PodHooks};
use crate::io::{ProcessIo, StdioPaths};
use crate::mounts::ContainerMounts;
use crate::network::{self, PodNetwork};
use crate::share::Share;
use crate::spec::{BundleSpec, GUEST_SHARED_DIR};
use crate::vm::{SandboxPaths, VmmProcess};

/// Exit status reported for processes whose VM died under them.
pub const VM_GONE_STATUS: u32 = 255;
/// The virtio-fs tag of the shared directory.
pub const SHARED_FS_TAG: &str = "wisp";
/// How long output may take to drain after a process exits before TaskExit is sent.
const OUTPUT_DRAIN: Duration = Duration::from_secs(30);

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

fn internal(e: impl std::fmt::Display) -> TaskError {
    TaskError::Internal(e.to_string())
}

/// A running VM with its agent.
struct Guest {
    vm: Arc<VmmProcess>,
    agent: Arc<Agent>,
    paths: SandboxPaths,
    grace: Duration,
    /// The taps and tc plumbing in the pod's network namespace, if it has one.
    net: Option<PodNetwork>,
    /// The spec's host-side hooks (`poststop` to run) and the network namespace the
    /// shim made for them, if any.
    hooks: Option<PodHooks>,
    /// The share's skeleton and the guest's read-only view of it.
    share: Arc<Share>,
}

/// The exit status of a process that could not be started (or was deleted before it
/// ran); like a shell's "cannot execute".
pub const START_FAILED_STATUS: u32 = 126;

/// How much of the guest console an unexpected VM end copies into the shim's log.
const CONSOLE_TAIL_LINES: usize = 40;
/// Of which at most this many bytes (read from the file's end).
const CONSOLE_TAIL_BYTES: u64 = 16 << 10;
/// OOM events passed on per second, and in a burst.
const OOM_EVENTS_PER_SEC: u32 = 10;
const OOM_EVENTS_BURST: u32 = 20;

/// What `boot` has set up so far. Dropped before `finish`, it undoes all of it: stops
/// the VMM, then tears the pod network down, then removes the state directory.
struct Booting {
    paths: SandboxPaths,
    net: Option<PodNetwork>,
    hooks: Option<PodHooks>,
    vm: Option<Arc<VmmProcess>>,
    armed: bool,
}

impl Booting {
    /// Boot succeeded: nothing is undone; the network and hooks are the sandbox's now.
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
        if let Some(vm) = self.vm.take() {
            vm.stop(Duration::ZERO);
        }
        if let Some(mut net) = self.net.take() {
            net.teardown();
        }
        if let Some(h) = self.hooks.take() {
            h.finish();
        }
        remove_state_dir(&self.paths.dir);
    }
}

#[derive(Default)]
struct State {
    guest: Option<Guest>,
    /// Set when the VM ended on its own; the reason, for error messages.
    vm_gone: Option<String>,
    containers: HashMap<String, Container>,
}

pub struct Sandbox {
    pub id: String,
    /// containerd's namespace of the shim's tasks (for `binary://` logging programs).
    namespace: String,
    events: Arc<dyn EventSink>,
    state: Mutex<State>,
    me: Weak<Sandbox>,
    /// Signalled when the shim may exit (no containers left, Shutdown called).
    pub done: Arc<crate::container::ExitCell>,
}

/// What Create needs from containerd's request.
pub struct CreateRequest {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<Mount>,
    pub stdio: StdioPaths,
    pub config_path: Option<PathBuf>,
}

impl Sandbox {
    pub fn new(
        id: &str,
        namespace: &str,
        events: Arc<dyn EventSink>,
        done: Arc<crate::container::ExitCell>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            id: id.into(),
            namespace: namespace.into(),
            events,
            state: Mutex::new(State::default()),
            me: me.clone(),
            done,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn agent(&self) -> Result<Arc<Agent>, TaskError> {
        let st = self.lock();
        match (&st.guest, &st.vm_gone) {
            (_, Some(why)) => Err(TaskError::FailedPrecondition(format!("the pod's VM is gone: {why}"))),
            (Some(g), None) => Ok(g.agent.clone()),
            (None, None) => Err(TaskError::FailedPrecondition("the pod's VM is not running".into())),
        }
    }

    // ---- the VM ----

    fn boot(&self, config: Config, spec: &BundleSpec, bundle: &Path) -> Result<(), TaskError> {
        let mut netns = network::netns_path(&spec.json).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let hooks = Hooks::from_spec(&spec.json).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let paths = SandboxPaths::new(&config.runtime.state_dir, &self.id);
        if paths.dir.exists() {
            return Err(TaskError::AlreadyExists(format!(
                "{} exists: another wisp sandbox with id {} is running or was not cleaned up",
                paths.dir.display(),
                self.id
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
                    "{} exists: another wisp sandbox with id {} is running",
                    paths.dir.display(),
                    self.id
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
            let h = PodHooks::start(hooks, &self.id, bundle, &spec.json, netns_at.as_deref())
                .map_err(|e| internal(format!("running the spec's hooks: {e}")))?;
            if let Some(ns) = h.netns() {
                netns = Some(ns.to_path_buf());
            }
            b.hooks = Some(h);
        }
        if let Some(netns) = &netns {
            b.net = Some(PodNetwork::setup(netns).map_err(|e| internal(format!("setting up the pod network: {e}")))?);
        }
        let me = self.me.clone();
        let on_exit = Box::new(move |why| {
            if let Some(sb) = me.upgrade() {
                sb.vm_ended(why);
            }
        });
        let devices = b.net.as_ref().map(PodNetwork::vmm_devices).unwrap_or_default();
        if !config.hypervisor.seccomp {
            log::warn!(
                "sandbox {}: hypervisor.seccomp is off: wisp-vmm's threads have no seccomp filter (for debugging only)",
                self.id
            );
        }
        if !config.hypervisor.jail {
            log::warn!(
                "sandbox {}: hypervisor.jail is off: wisp-vmm runs unconfined, as root in the host's namespaces \
                 (for debugging only)",
                self.id
            );
        }
        let cgroups_path = spec.json.pointer("/linux/cgroupsPath").and_then(serde_json::Value::as_str);
        let vm = Arc::new(VmmProcess::start(&config, &paths, &devices, cgroups_path, on_exit).map_err(internal)?);
        drop(devices);
        b.vm = Some(vm.clone());
        let a = &config.agent;
        let vm_gone = || vm.exited();
        let agent =
            Agent::connect(&paths.vsock(), a.dial_attempt_timeout(), a.dial_timeout(), a.rpc_timeout(), &vm_gone);
        let agent = Arc::new(agent.map_err(|e| {
            if let Some(tail) = console_tail(&paths) {
                log::warn!("sandbox {}: the agent never answered; last guest console lines:\n{tail}", self.id);
            }
            internal(format!("starting the pod's VM: {e}"))
        })?);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let req = agent::CreateSandboxRequest {
            sandbox_id: self.id.clone(),
            hostname: spec.hostname(),
            shared_fs_tag: SHARED_FS_TAG.into(),
            shared_fs_mount_point: GUEST_SHARED_DIR.into(),
            guest_time_unix_sec: now.as_secs() as i64,
            guest_time_nsec: now.subsec_nanos(),
            ..Default::default()
        };
        agent.client.create_sandbox(agent.ctx(), &req).map_err(|e| task_error("CreateSandbox", e))?;
        if let Some(net) = &b.net {
            configure_guest_network(&agent, net)?;
        }
        let (net, hooks) = b.finish();
        let grace = config.runtime.shutdown_grace();
        self.lock().guest = Some(Guest { vm, agent: agent.clone(), paths, grace, net, hooks, share });
        self.watch_oom(agent);
        Ok(())
    }

    /// Passes the guest's OOM events on to containerd: only for this sandbox's own
    /// containers, and at most `OOM_EVENTS_PER_SEC` (burst `OOM_EVENTS_BURST`), so a
    /// hostile agent cannot flood containerd with events or name other pods' containers.
    fn watch_oom(&self, agent: Arc<Agent>) {
        let me = self.me.clone();
        std::thread::spawn(move || {
            let mut limit = crate::bounds::RateLimit::new(OOM_EVENTS_PER_SEC, OOM_EVENTS_BURST);
            loop {
                let Ok(ev) = agent.client.get_oom_event(agent.long_poll_ctx(), &agent::Empty::new()) else { return };
                let Some(sb) = me.upgrade() else { return };
                let known = sb.lock().containers.contains_key(&ev.container_id);
                if !known {
                    let id = crate::bounds::guest_text(&ev.container_id, 128, false);
                    log::warn!(
                        "sandbox {}: the guest reported an OOM kill in {id:?}, not a container of this pod: ignored",
                        sb.id
                    );
                    continue;
                }
                if !limit.allow() {
                    if limit.dropped.is_power_of_two() {
                        log::warn!("sandbox {}: {} OOM events over the rate limit dropped", sb.id, limit.dropped);
                    }
                    continue;
                }
                log::info!("OOM kill in container {}", ev.container_id);
                sb.events.publish(
                    topics::TASK_OOM_EVENT_TOPIC,
                    Box::new(TaskOOM { container_id: ev.container_id, ..Default::default() }),
                );
            }
        });
    }

    /// The VMM process ended: every live process exits with VM_GONE_STATUS.
    fn vm_ended(&self, why: String) {
        let mut st = self.lock();
        if st.guest.is_none() {
            return;
        }
        log::warn!("sandbox {}: the VM ended: {why}", self.id);
        // With `debug` on, the guest's last console lines say why (panic, reset), and
        // the state directory holding them goes with the sandbox: keep them in the log.
        if let Some(tail) = st.guest.as_ref().and_then(|g| console_tail(&g.paths)) {
            log::warn!("sandbox {}: last guest console lines:\n{tail}", self.id);
        }
        st.vm_gone = Some(why);
        let mut exits = Vec::new();
        for c in st.containers.values_mut() {
            let procs = std::iter::once(&mut c.init).chain(c.execs.values_mut());
            for p in procs {
                if p.status != Status::Stopped {
                    let _ = p.apply(Action::Exit);
                    let e = p.exit.set(Exit::now(VM_GONE_STATUS));
                    if p.guest_pid != 0 {
                        exits.push((c.id.clone(), p.exec_id.clone(), e));
                    }
                }
            }
        }
        drop(st);
        for (cid, eid, e) in exits {
            self.publish_exit(&cid, &eid, e);
        }
    }

    /// Asks the agent to end the guest, stops the VMM, removes the state directory.
    fn teardown(&self) {
        let (guest, tail_logged) = {
            let mut st = self.lock();
            (st.guest.take(), st.vm_gone.is_some())
        };
        if let Some(g) = guest {
            // A VMM that is already gone, or an agent that no longer answers, means the
            // guest ended by itself (panic, reset): its console says why (`vm_ended`
            // logged it if it came first).
            let unexpected =
                g.vm.exited().is_some() || g.agent.client.destroy_sandbox(g.agent.ctx(), &agent::Empty::new()).is_err();
            g.vm.stop(g.grace);
            if unexpected && !tail_logged {
                if let Some(tail) = console_tail(&g.paths) {
                    log::warn!("sandbox {}: the guest ended on its own; last guest console lines:\n{tail}", self.id);
                }
            }
            // After the VMM, which holds the taps, is gone.
            if let Some(mut net) = g.net {
                net.teardown();
            }
            // poststop (CNI DEL for nerdctl) after our plumbing left the namespace.
            if let Some(h) = g.hooks {
                h.finish();
            }
            // Our fds on the share go first, so its view unmounts without a lazy detach.
            drop(g.share);
            remove_state_dir(&g.paths.dir);
        }
    }

    // ---- containers ----

    pub fn create(&self, req: CreateRequest) -> Result<(), TaskError> {
        if req.id.is_empty() || req.id.contains('/') || req.id.len() > wisp_protocols::stdio::MAX_ID_LEN {
            return Err(TaskError::InvalidArgument(format!("container id {:?} is not usable", req.id)));
        }
        if self.lock().containers.contains_key(&req.id) {
            return Err(TaskError::AlreadyExists(format!("container {} already exists", req.id)));
        }
        let spec = BundleSpec::load(&req.bundle).map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        crate::mounts::check_bind_sources(&spec.shared_binds())
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let first = self.lock().guest.is_none();
        if first {
            let config = crate::options::sandbox_config(req.config_path.clone(), &spec.annotations())
                .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
            config.check_host_files().map_err(|e| TaskError::FailedPrecondition(e.to_string()))?;
            self.boot(config, &spec, Path::new(&req.bundle))?;
        } else if Hooks::from_spec(&spec.json).is_ok_and(|h| !h.is_empty()) {
            log::warn!(
                "container {}: the hooks in its spec are not run: wisp runs a pod's host-side hooks \
                 (createRuntime, poststop) for its sandbox container only",
                req.id
            );
        }
        let result = self.create_in_guest(&req, &spec);
        if result.is_err() && first {
            self.teardown();
        }
        result
    }

    fn create_in_guest(&self, req: &CreateRequest, spec: &BundleSpec) -> Result<(), TaskError> {
        let agent = self.agent()?;
        let (share, vsock) = {
            let st = self.lock();
            let g = st.guest.as_ref().ok_or_else(|| TaskError::FailedPrecondition("no VM".into()))?;
            (g.share.clone(), g.paths.vsock())
        };
        let mut mounts = ContainerMounts::new(share, &req.id);
        mounts.mount_rootfs(&req.rootfs, &spec.root_path(&req.bundle)).map_err(internal)?;
        mounts.mount_binds(&spec.shared_binds()).map_err(internal)?;

        let guest_spec = serde_json::to_vec(&spec.for_guest(&req.id)).map_err(internal)?;
        let creq = agent::CreateContainerRequest {
            container_id: req.id.clone(),
            oci_spec_json: guest_spec,
            stdio: protobuf::MessageField::some(req.stdio.spec()),
            sandbox_container: spec.is_sandbox_container(),
            ..Default::default()
        };
        agent
            .client
            .create_container(agent.ctx(), &creq)
            .map_err(|e| task_error("CreateContainer", e))?;
        let io = match ProcessIo::attach(&vsock, &req.id, "", &req.stdio, &self.namespace) {
            Ok(io) => io,
            Err(e) => {
                let rm = agent::RemoveContainerRequest {
                    container_id: req.id.clone(),
                    timeout_ms: 5000,
                    ..Default::default()
                };
                let _ = agent.client.remove_container(agent.ctx(), &rm);
                return Err(internal(e));
            }
        };
        let mut init = Process::new("", req.stdio.clone(), Vec::new());
        init.io = Some(Arc::new(Mutex::new(io)));
        let container =
            Container { id: req.id.clone(), bundle: req.bundle.clone(), init, execs: HashMap::new(), mounts };
        self.lock().containers.insert(req.id.clone(), container);
        self.events.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.display().to_string(),
                rootfs: req.rootfs.clone(),
                io: protobuf::MessageField::some(TaskIO {
                    stdin: req.stdio.stdin.clone(),
                    stdout: req.stdio.stdout.clone(),
                    stderr: req.stdio.stderr.clone(),
                    terminal: req.stdio.terminal,
                    ..Default::default()
                }),
                pid: std::process::id(),
                ..Default::default()
            }),
        );
        Ok(())
    }

    fn with_process<T>(
        &self,
        cid: &str,
        eid: &str,
        f: impl FnOnce(&mut Process) -> Result<T, TaskError>,
    ) -> Result<T, TaskError> {
        let mut st = self.lock();
        let c = st.containers.get_mut(cid).ok_or_else(|| TaskError::NotFound(format!("container {cid} not found")))?;
        let p = c
            .process_mut(eid)
            .ok_or_else(|| TaskError::NotFound(format!("exec {eid} of container {cid} not found")))?;
        f(p)
    }

    /// Starts a container's init process or an exec; returns the pid reported to containerd.
    pub fn start(&self, cid: &str, eid: &str) -> Result<u32, TaskError> {
        let (status, stdio, spec) = self.with_process(cid, eid, |p| Ok((p.status, p.stdio.clone(), p.spec.clone())))?;
        let agent = self.agent()?;
        if status != Status::Created {
            return Err(TaskError::FailedPrecondition(format!("{cid}/{eid} is {status:?}, not created")));
        }
        let started = self.start_in_guest(&agent, cid, eid, stdio, spec);
        if started.is_err() {
            // The process will never run: it is stopped, and whoever waits for it (a
            // Wait call holds a ttrpc worker) must wake up now, not never.
            let _ = self.with_process(cid, eid, |p| {
                let _ = p.apply(Action::Exit);
                p.exit.set(Exit::now(START_FAILED_STATUS));
                Ok(())
            });
        }
        let guest_pid = started?;
        self.with_process(cid, eid, |p| {
            p.guest_pid = guest_pid;
            p.apply(Action::Start).map_err(|e| TaskError::FailedPrecondition(e.to_string()))
        })?;
        self.spawn_waiter(agent, cid, eid);
        let pid = std::process::id();
        if eid.is_empty() {
            self.events.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart { container_id: cid.into(), pid, ..Default::default() }),
            );
        } else {
            self.events.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted { container_id: cid.into(), exec_id: eid.into(), pid, ..Default::default() }),
            );
        }
        Ok(pid)
    }

    /// Starts the container's init or an exec in the guest; returns the guest pid.
    fn start_in_guest(
        &self,
        agent: &Agent,
        cid: &str,
        eid: &str,
        stdio: StdioPaths,
        spec: Vec<u8>,
    ) -> Result<u32, TaskError> {
        let guest_pid = if eid.is_empty() {
            let req = agent::ContainerRequest { container_id: cid.into(), ..Default::default() };
            agent.client.start_container(agent.ctx(), &req).map_err(|e| task_error("StartContainer", e))?.pid
        } else {
            let req = agent::ExecProcessRequest {
                container_id: cid.into(),
                exec_id: eid.into(),
                process_json: spec,
                stdio: protobuf::MessageField::some(stdio.spec()),
                ..Default::default()
            };
            let pid = agent
                .client
                .exec_process(agent.ctx(), &req)
                .map_err(|e| task_error("ExecProcess", e))?
                .pid;
            let vsock = self.lock().guest.as_ref().map(|g| g.paths.vsock()).unwrap_or_default();
            let io = ProcessIo::attach(&vsock, cid, eid, &stdio, &self.namespace).map_err(internal)?;
            self.with_process(cid, eid, |p| {
                p.io = Some(Arc::new(Mutex::new(io)));
                Ok(())
            })?;
            pid
        };
        Ok(guest_pid)
    }

    /// Long-polls the agent for the process's exit, drains its output, then records the
    /// exit and publishes TaskExit. A broken connection (VM gone) counts as 255.
    fn spawn_waiter(&self, agent: Arc<Agent>, cid: &str, eid: &str) {
        let me = self.me.clone();
        let (cid, eid) = (cid.to_string(), eid.to_string());
        std::thread::spawn(move || {
            let req = agent::ProcessRequest { container_id: cid.clone(), exec_id: eid.clone(), ..Default::default() };
            let status = match agent.client.wait_process(agent.long_poll_ctx(), &req) {
                Ok(r) => r.exit_status as u32,
                Err(e) => {
                    log::warn!("waiting for {cid}/{eid}: {}", call_error("WaitProcess", e));
                    VM_GONE_STATUS
                }
            };
            let Some(sb) = me.upgrade() else { return };
            let io = sb.with_process(&cid, &eid, |p| Ok(p.io.clone())).ok().flatten();
            if let Some(io) = io {
                let drained = io.lock().unwrap_or_else(|e| e.into_inner()).wait_output(OUTPUT_DRAIN);
                if !drained {
                    log::warn!(
                        "{cid}/{eid}: output still flowing {OUTPUT_DRAIN:?} after exit; reporting the exit anyway"
                    );
                }
            }
            let exit = sb.with_process(&cid, &eid, |p| {
                if p.status == Status::Stopped {
                    return Ok(None);
                }
                let _ = p.apply(Action::Exit);
                let e = p.exit.set(Exit::now(status));
                Ok(Some(e))
            });
            if let Ok(Some(e)) = exit {
                sb.publish_exit(&cid, &eid, e);
            }
        });
    }

    fn publish_exit(&self, cid: &str, eid: &str, e: Exit) {
        let id = if eid.is_empty() { cid } else { eid };
        self.events.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: cid.into(),
                id: id.into(),
                pid: std::process::id(),
                exit_status: e.status,
                exited_at: protobuf::MessageField::some(timestamp(e.at)),
                ..Default::default()
            }),
        );
    }

    pub fn add_exec(&self, cid: &str, eid: &str, stdio: StdioPaths, spec: Vec<u8>) -> Result<(), TaskError> {
        if eid.is_empty() || eid.len() > wisp_protocols::stdio::MAX_ID_LEN {
            return Err(TaskError::InvalidArgument(format!("exec id {eid:?} is not usable")));
        }
        {
            let mut st = self.lock();
            let c =
                st.containers.get_mut(cid).ok_or_else(|| TaskError::NotFound(format!("container {cid} not found")))?;
            if c.init.status != Status::Running {
                return Err(TaskError::FailedPrecondition(format!(
                    "container {cid} is {:?}, not running",
                    c.init.status
                )));
            }
            if c.execs.contains_key(eid) {
                return Err(TaskError::AlreadyExists(format!("exec {eid} already exists in {cid}")));
            }
            c.execs.insert(eid.into(), Process::new(eid, stdio, spec));
        }
        self.events.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded { container_id: cid.into(), exec_id: eid.into(), ..Default::default() }),
        );
        Ok(())
    }

    /// Deletes an exec or a container (whose processes must have stopped). Deleting the
    /// last container tears the VM down.
    pub fn delete(&self, cid: &str, eid: &str) -> Result<(u32, Exit), TaskError> {
        if !eid.is_empty() {
            let mut st = self.lock();
            let c =
                st.containers.get_mut(cid).ok_or_else(|| TaskError::NotFound(format!("container {cid} not found")))?;
            let p = c.execs.get(eid).ok_or_else(|| TaskError::NotFound(format!("exec {eid} of {cid} not found")))?;
            if p.status == Status::Running || p.status == Status::Paused {
                return Err(TaskError::FailedPrecondition(format!("exec {eid} is still running")));
            }
            let p = c.execs.remove(eid).ok_or_else(|| TaskError::NotFound(eid.into()))?;
            // An exec deleted without ever running: wake anyone waiting for it.
            let exit = p.exit.get().unwrap_or_else(|| p.exit.set(Exit::now(START_FAILED_STATUS)));
            return Ok((std::process::id(), exit));
        }
        let (status, exit) = self.with_process(cid, "", |p| Ok((p.status, p.exit.get())))?;
        if status == Status::Running || status == Status::Paused {
            return Err(TaskError::FailedPrecondition(format!("container {cid} is still running; kill it first")));
        }
        if let Ok(agent) = self.agent() {
            let req =
                agent::RemoveContainerRequest { container_id: cid.into(), timeout_ms: 10_000, ..Default::default() };
            if let Err(e) = agent.client.remove_container(agent.ctx(), &req) {
                log::warn!("removing {cid} in the guest: {}", call_error("RemoveContainer", e));
            }
        }
        let removed = self.lock().containers.remove(cid);
        let exit = exit.unwrap_or(Exit::now(0));
        if let Some(mut c) = removed {
            if let Some(io) = c.init.io.take() {
                io.lock().unwrap_or_else(|e| e.into_inner()).close_stdin();
            }
            c.mounts.unmount_all();
        }
        self.events.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: cid.into(),
                id: cid.into(),
                pid: std::process::id(),
                exit_status: exit.status,
                exited_at: protobuf::MessageField::some(timestamp(exit.at)),
                ..Default::default()
            }),
        );
        if self.lock().containers.is_empty() {
            self.teardown();
            self.done.set(Exit::now(0));
        }
        Ok((std::process::id(), exit))
    }

    pub fn kill(&self, cid: &str, eid: &str, signal: u32, all: bool) -> Result<(), TaskError> {
        let status = self.with_process(cid, eid, |p| Ok(p.status))?;
        if status == Status::Stopped {
            return Err(TaskError::NotFound(format!("process {cid}/{eid} already finished")));
        }
        if status == Status::Created && eid.is_empty() {
            // Never started: nothing runs in the guest yet; it just becomes stopped.
            let exit = self.with_process(cid, eid, |p| {
                let _ = p.apply(Action::Exit);
                let e = p.exit.set(Exit::now(128 + signal));
                Ok(e)
            })?;
            self.publish_exit(cid, eid, exit);
            return Ok(());
        }
        let agent = self.agent()?;
        let req = agent::SignalProcessRequest {
            container_id: cid.into(),
            exec_id: eid.into(),
            signal,
            all,
            ..Default::default()
        };
        agent.client.signal_process(agent.ctx(), &req).map_err(|e| match task_error("SignalProcess", e) {
            // The VM ended under the call: the process is gone with it.
            TaskError::Internal(msg) => match self.lock().vm_gone.clone() {
                Some(why) => TaskError::NotFound(format!("process {cid}/{eid}: the VM ended ({why})")),
                None => TaskError::Internal(msg),
            },
            other => other,
        })?;
        Ok(())
    }

    pub fn wait(&self, cid: &str, eid: &str) -> Result<Exit, TaskError> {
        let cell = self.with_process(cid, eid, |p| Ok(p.exit.clone()))?;
        Ok(cell.wait())
    }

    pub fn state(&self, cid: &str, eid: &str) -> Result<(Status, StdioPaths, Option<Exit>, PathBuf), TaskError> {
        let st = self.lock();
        let c = st.containers.get(cid).ok_or_else(|| TaskError::NotFound(format!("container {cid} not found")))?;
        let p = c.process(eid).ok_or_else(|| TaskError::NotFound(format!("exec {eid} of {cid} not found")))?;
        Ok((p.status, p.stdio.clone(), p.exit.get(), c.bundle.clone()))
    }

    pub fn pause(&self, cid: &str, pause: bool) -> Result<(), TaskError> {
        let action = if pause { Action::Pause } else { Action::Resume };
        let status = self.with_process(cid, "", |p| Ok(p.status))?;
        let agent = self.agent()?;
        crate::container::transition(status, action).map_err(|e| TaskError::FailedPrecondition(e.to_string()))?;
        let req = agent::ContainerRequest { container_id: cid.into(), ..Default::default() };
        if pause {
            agent.client.pause_container(agent.ctx(), &req).map_err(|e| task_error("PauseContainer", e))?;
        } else {
            agent.client.resume_container(agent.ctx(), &req).map_err(|e| task_error("ResumeContainer", e))?;
        }
        self.with_process(cid, "", |p| p.apply(action).map_err(|e| TaskError::FailedPrecondition(e.to_string())))?;
        if pause {
            self.events.publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused { container_id: cid.into(), ..Default::default() }),
            );
        } else {
            self.events.publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed { container_id: cid.into(), ..Default::default() }),
            );
        }
        Ok(())
    }

    pub fn pids(&self, cid: &str) -> Result<Vec<u32>, TaskError> {
        self.with_process(cid, "", |_| Ok(()))?;
        let agent = self.agent()?;
        let req = agent::ContainerRequest { container_id: cid.into(), ..Default::default() };
        Ok(agent.client.list_processes(agent.ctx(), &req).map_err(|e| task_error("ListProcesses", e))?.pids)
    }

    pub fn stats(&self, cid: &str) -> Result<agent::StatsContainerResponse, TaskError> {
        self.with_process(cid, "", |_| Ok(()))?;
        let agent = self.agent()?;
        let req = agent::ContainerRequest { container_id: cid.into(), ..Default::default() };
        agent.client.stats_container(agent.ctx(), &req).map_err(|e| task_error("StatsContainer", e))
    }

    pub fn update(&self, cid: &str, resources_json: Vec<u8>) -> Result<(), TaskError> {
        self.with_process(cid, "", |_| Ok(()))?;
        let agent = self.agent()?;
        let req = agent::UpdateContainerRequest { container_id: cid.into(), resources_json, ..Default::default() };
        agent
            .client
            .update_container(agent.ctx(), &req)
            .map_err(|e| task_error("UpdateContainer", e))?;
        Ok(())
    }

    pub fn resize_pty(&self, cid: &str, eid: &str, width: u32, height: u32) -> Result<(), TaskError> {
        self.with_process(cid, eid, |_| Ok(()))?;
        let agent = self.agent()?;
        let req = agent::TtyWinResizeRequest {
            container_id: cid.into(),
            exec_id: eid.into(),
            rows: height,
            cols: width,
            ..Default::default()
        };
        agent.client.tty_win_resize(agent.ctx(), &req).map_err(|e| task_error("TtyWinResize", e))?;
        Ok(())
    }

    pub fn close_stdin(&self, cid: &str, eid: &str) -> Result<(), TaskError> {
        let io = self.with_process(cid, eid, |p| Ok(p.io.clone()))?;
        if let Some(io) = io {
            io.lock().unwrap_or_else(|e| e.into_inner()).close_stdin();
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.lock().containers.is_empty()
    }

    /// Shutdown with containers left (containerd only asks when there are none): tear
    /// everything down anyway, as the shim is about to go.
    pub fn shutdown_now(&self) {
        let ids: Vec<String> = self.lock().containers.keys().cloned().collect();
        for id in ids {
            if let Some(mut c) = self.lock().containers.remove(&id) {
                c.mounts.unmount_all();
            }
        }
        self.teardown();
        self.done.set(Exit::now(0));
    }
}

/// The end of the guest console log (written only with `debug` on).
/// The guest console's last lines (the guest's text: read from the end of the file
/// only, control characters replaced).
fn console_tail(paths: &SandboxPaths) -> Option<String> {
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
/// interface's MAC) and then its routes.
fn configure_guest_network(agent: &Agent, net: &PodNetwork) -> Result<(), TaskError> {
    for iface in net.interfaces() {
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

pub fn timestamp(t: SystemTime) -> protobuf::well_known_types::timestamp::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    protobuf::well_known_types::timestamp::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// Removes a sandbox state directory: everything below should already be unmounted
/// (`ContainerMounts`); anything still mounted is unmounted first (found in the mount
/// table, opened without following a symlink), and the removal never follows a symlink
/// nor enters a mount, so no file on a volume or elsewhere on the host is ever deleted
/// through it.
pub fn remove_state_dir(dir: &Path) {
    crate::cleanup::unmount_below(dir);
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else { return };
    let removed = crate::hostfs::Dir::open_trusted(parent).and_then(|p| p.remove_tree(Path::new(name)));
    if let Err(e) = removed {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("removing {}: {e}", dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorded(Mutex<Vec<String>>);
    impl EventSink for Recorded {
        fn publish(&self, topic: &str, _event: Box<dyn protobuf::MessageDyn>) {
            self.0.lock().unwrap().push(topic.to_string());
        }
    }

    fn sandbox() -> (Arc<Sandbox>, Arc<Recorded>) {
        let events = Arc::new(Recorded::default());
        (Sandbox::new("sb", "ns", events.clone(), Arc::default()), events)
    }

    fn request(dir: &Path, id: &str, annotations: serde_json::Value) -> CreateRequest {
        let spec = serde_json::json!({
            "ociVersion": "1.0.2", "process": { "args": ["true"], "cwd": "/" },
            "root": { "path": "rootfs" }, "annotations": annotations
        });
        std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
        let state = dir.join("state");
        std::fs::write(dir.join("wisp.toml"), format!("[runtime]\nstate_dir = \"{}\"\n", state.display())).unwrap();
        CreateRequest {
            id: id.into(),
            bundle: dir.to_path_buf(),
            rootfs: Vec::new(),
            stdio: StdioPaths::default(),
            config_path: Some(dir.join("wisp.toml")),
        }
    }

    #[test]
    fn bad_create_requests_are_refused_before_any_vm_exists() {
        let dir = tempfile::tempdir().unwrap();
        let (sb, events) = sandbox();
        let e = sb.create(request(dir.path(), "a/b", serde_json::json!({}))).unwrap_err();
        assert!(matches!(e, TaskError::InvalidArgument(_)), "{e}");
        let e = sb.create(request(dir.path(), &"x".repeat(300), serde_json::json!({}))).unwrap_err();
        assert!(matches!(e, TaskError::InvalidArgument(_)), "{e}");

        let refused = serde_json::json!({ "io.wisp.config.hypervisor.vcpus": "2" });
        let e = sb.create(request(dir.path(), "c1", refused)).unwrap_err();
        assert!(matches!(e, TaskError::InvalidArgument(_)) && e.to_string().contains("hypervisor.vcpus"), "{e}");

        let mut bad_bundle = request(dir.path(), "c1", serde_json::json!({}));
        bad_bundle.bundle = dir.path().join("missing");
        let e = sb.create(bad_bundle).unwrap_err();
        assert!(e.to_string().contains("config.json"), "{e}");

        std::fs::write(dir.path().join("wisp.toml"), "[hypervisor]\nvcpu = 2\n").unwrap();
        let mut r = request(dir.path(), "c1", serde_json::json!({}));
        std::fs::write(dir.path().join("wisp.toml"), "[hypervisor]\nvcpu = 2\n").unwrap();
        r.config_path = Some(dir.path().join("wisp.toml"));
        let e = sb.create(r).unwrap_err();
        assert!(e.to_string().contains("hypervisor.vcpu"), "{e}");

        assert!(!dir.path().join("state").exists(), "a refused create left a state directory");
        assert!(sb.is_empty() && events.0.lock().unwrap().is_empty(), "a refused create left state or sent events");
    }

    #[test]
    fn calls_on_unknown_tasks_are_not_found() {
        let (sb, _) = sandbox();
        let nf = |r: Result<(), TaskError>| assert!(matches!(r, Err(TaskError::NotFound(_))), "{r:?}");
        nf(sb.start("nope", "").map(|_| ()));
        nf(sb.pause("nope", true));
        nf(sb.kill("nope", "", 9, false));
        nf(sb.delete("nope", "").map(|_| ()));
        nf(sb.wait("nope", "").map(|_| ()));
        nf(sb.state("nope", "").map(|_| ()));
        nf(sb.pids("nope").map(|_| ()));
        nf(sb.stats("nope").map(|_| ()));
        nf(sb.update("nope", b"{}".to_vec()));
        nf(sb.resize_pty("nope", "", 80, 24));
        nf(sb.close_stdin("nope", ""));
        nf(sb.add_exec("nope", "e1", StdioPaths::default(), b"{}".to_vec()));
        let e = sb.add_exec("nope", "", StdioPaths::default(), b"{}".to_vec()).unwrap_err();
        assert!(matches!(e, TaskError::InvalidArgument(_)), "{e}");
    }
}
