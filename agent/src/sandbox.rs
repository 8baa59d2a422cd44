//! The pod: the containers the agent runs and every operation on them, independent of
//! ttrpc (the `server` module only translates). Each operation validates its request,
//! checks the container's state, does the work, and on failure leaves nothing behind
//! (bundle directory, libcontainer state, cgroup).
//!
//! Trusts: nothing in requests. Container and exec ids are checked before they name
//! files; specs go through `spec`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use wisp_protocols::agent as pb;

use crate::cgroup::{CgroupError, CgroupMode, ContainerCgroup};
use crate::container::{Container, ContainerState, Operation, StateError, Transition};
use crate::engine::{Engine, EngineError, ExecParams, InitParams};
use crate::guest::{self, GuestError};
use crate::oom::{ContainerSource, OomError, OomEvents};
use crate::process::{Process, ProcessError};
use crate::reaper::{ExitStatus, Reaper, ReaperError};
use crate::spec::{self, PodRole, SpecError, SpecPolicy};
use crate::stdio::{ProcessIo, ProcessLookup, StdioError, StdioRequest};

const DEFAULT_REMOVE_TIMEOUT: Duration = Duration::from_secs(10);
const SIGKILL: i32 = libc::SIGKILL;
/// How long the agent keeps killing what a container's exited init left behind.
const LEFTOVER_KILL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("container {0} not found")]
    NotFound(String),
    #[error("process {exec_id:?} not found in container {container_id}")]
    ProcessNotFound { container_id: String, exec_id: String },
    #[error("container {0} already exists")]
    Exists(String),
    #[error("exec {exec_id} is already running in container {container_id}")]
    ExecExists { container_id: String, exec_id: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Timeout(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Stdio(#[from] StdioError),
    #[error(transparent)]
    Oom(#[from] OomError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
}

/// The protocol-level class of an error (mapped to a ttrpc code by `server`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    DeadlineExceeded,
    Cancelled,
    Internal,
}

impl SandboxError {
    pub fn class(&self) -> ErrorClass {
        use ErrorClass::*;
        match self {
            Self::NotFound(_) | Self::ProcessNotFound { .. } => NotFound,
            Self::Exists(_) | Self::ExecExists { .. } => AlreadyExists,
            Self::Invalid(_) | Self::Spec(_) => InvalidArgument,
            Self::Precondition(_) | Self::State(_) => FailedPrecondition,
            Self::Timeout(_) => DeadlineExceeded,
            Self::Process(ProcessError::Exited { .. }) => NotFound,
            Self::Process(ProcessError::Signal(ReaperError::BadSignal(_))) => InvalidArgument,
            Self::Process(ProcessError::Cancelled) | Self::Oom(_) => Cancelled,
            Self::Process(ProcessError::Stdio(_)) | Self::Stdio(_) => FailedPrecondition,
            Self::Process(_) => Internal,
            Self::Engine(EngineError::Create { .. } | EngineError::Exec { .. }) => FailedPrecondition,
            Self::Engine(_) => Internal,
            Self::Cgroup(CgroupError::Stats(crate::stats::StatsError::NoCgroup(_))) => NotFound,
            Self::Cgroup(_) => Internal,
            Self::Guest(GuestError::Invalid(_)) => InvalidArgument,
            Self::Guest(_) => Internal,
            Self::Network(e) => e.class(),
            Self::Io { .. } => Internal,
        }
    }
}

type Result<T, E = SandboxError> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SandboxError {
    let what = what.into();
    move |source| SandboxError::Io { what, source }
}

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// PID 1 of the guest VM (else host test mode: nothing machine-wide is changed).
    pub guest: bool,
    pub state_dir: PathBuf,
    pub cgroup_parent: PathBuf,
}

enum Slot {
    Creating,
    Ready(Arc<Container>),
}

#[derive(Default)]
struct PodInfo {
    sandbox_id: Option<String>,
    sandbox_container: Option<String>,
    shared_mount: Option<PathBuf>,
}

pub struct Sandbox {
    cfg: SandboxConfig,
    policy: SpecPolicy,
    reaper: Arc<Reaper>,
    engine: Engine,
    cgroup_mode: CgroupMode,
    containers: Mutex<HashMap<String, Slot>>,
    pod: Mutex<PodInfo>,
    exec_lock: Mutex<()>,
    pub oom: Arc<OomEvents>,
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn stdio_request(s: Option<&pb::StdioSpec>) -> StdioRequest {
    s.map(|s| StdioRequest { stdin: s.stdin, stdout: s.stdout, stderr: s.stderr, terminal: s.terminal })
        .unwrap_or_default()
}

fn make_io(req: StdioRequest) -> Result<(Arc<ProcessIo>, Option<crate::stdio::ChildStdio>)> {
    if req.terminal {
        Ok((Arc::new(ProcessIo::terminal()), None))
    } else {
        let (io, child) = ProcessIo::pipes(req)?;
        Ok((Arc::new(io), Some(child)))
    }
}

impl Sandbox {
    pub fn new(cfg: SandboxConfig, reaper: Arc<Reaper>) -> Result<Arc<Self>> {
        std::fs::create_dir_all(cfg.state_dir.join("bundles")).map_err(io_err("creating the state directory"))?;
        let _ = std::fs::remove_dir_all(cfg.state_dir.join("t"));
        let engine = Engine::new(&cfg.state_dir, reaper.clone()).map_err(io_err("creating the state directory"))?;
        let policy = SpecPolicy { guest: cfg.guest, cgroup_parent: cfg.cgroup_parent.clone() };
        Ok(Arc::new(Self {
            policy,
            reaper,
            engine,
            cgroup_mode: CgroupMode::detect(),
            containers: Mutex::new(HashMap::new()),
            pod: Mutex::new(PodInfo::default()),
            exec_lock: Mutex::new(()),
            oom: Arc::new(OomEvents::default()),
            started: Instant::now(),
            cfg,
        }))
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn get(&self, id: &str) -> Result<Arc<Container>> {
        match lock(&self.containers).get(id) {
            Some(Slot::Ready(c)) => Ok(c.clone()),
            Some(Slot::Creating) => Err(SandboxError::Precondition(format!("container {id} is still being created"))),
            None => Err(SandboxError::NotFound(id.to_string())),
        }
    }

    fn process(&self, container_id: &str, exec_id: &str) -> Result<(Arc<Container>, Arc<Process>)> {
        let c = self.get(container_id)?;
        let p = c.process(exec_id).ok_or_else(|| SandboxError::ProcessNotFound {
            container_id: container_id.into(),
            exec_id: exec_id.into(),
        })?;
        Ok((c, p))
    }

    fn bundle_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("bundles").join(id)
    }

    // ---- sandbox ----

    pub fn create_sandbox(&self, req: &pb::CreateSandboxRequest) -> Result<()> {
        spec::validate_id("sandbox", &req.sandbox_id)?;
        guest::check_entropy(&req.entropy)?;
        let mut pod = lock(&self.pod);
        if let Some(id) = &pod.sandbox_id {
            return Err(SandboxError::Precondition(format!("sandbox {id} was already created in this agent")));
        }
        if self.cfg.guest {
            // Before the sandbox's identity: a clone of a VM template reseeds first.
            guest::add_entropy(&req.entropy)?;
            if req.guest_time_unix_sec > 0 {
                guest::set_time(req.guest_time_unix_sec, req.guest_time_nsec)?;
            }
            if !req.hostname.is_empty() {
                guest::set_hostname(&req.hostname)?;
            }
            if !req.shared_fs_tag.is_empty() {
                let mp = if req.shared_fs_mount_point.is_empty() {
                    PathBuf::from(guest::DEFAULT_SHARED_MOUNT)
                } else {
                    PathBuf::from(&req.shared_fs_mount_point)
                };
                guest::mount_shared_fs(&req.shared_fs_tag, &mp)?;
                pod.shared_mount = Some(mp);
            }
        } else {
            log::info!(
                "host mode: sandbox {} leaves the host's clock, hostname, resolv.conf and mounts alone",
                req.sandbox_id
            );
        }
        pod.sandbox_id = Some(req.sandbox_id.clone());
        Ok(())
    }

    /// Stops and removes every container. The caller then ends the VM (or the agent).
    pub fn destroy(&self) {
        let ids: Vec<String> = lock(&self.containers)
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Ready(_)))
            .map(|(id, _)| id.clone())
            .collect();
        // Members first, the sandbox container last.
        let sandbox = lock(&self.pod).sandbox_container.clone();
        let (mut order, last): (Vec<String>, Vec<String>) =
            ids.into_iter().partition(|id| Some(id) != sandbox.as_ref());
        order.extend(last);
        for id in order {
            if let Err(e) = self.remove_container(&id, Duration::from_secs(5)) {
                log::warn!("destroying sandbox: {e}");
            }
        }
        if let Some(mp) = lock(&self.pod).shared_mount.take() {
            let _ = nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH);
        }
        nix::unistd::sync();
    }

    // ---- containers ----

    pub fn create_container(&self, req: &pb::CreateContainerRequest) -> Result<()> {
        let id = req.container_id.as_str();
        spec::validate_id("container", id)?;
        {
            let mut map = lock(&self.containers);
            if map.contains_key(id) {
                return Err(SandboxError::Exists(id.into()));
            }
            map.insert(id.to_string(), Slot::Creating);
        }
        let mut cleanup = CreateCleanup { sandbox: self, id, cgroup: None, bundle: None, armed: true };
        let result = self.do_create(req, &mut cleanup);
        if result.is_err() {
            drop(cleanup);
        } else {
            cleanup.armed = false;
        }
        result
    }

    fn do_create(&self, req: &pb::CreateContainerRequest, cleanup: &mut CreateCleanup<'_>) -> Result<()> {
        let id = req.container_id.as_str();
        let stdio = stdio_request(req.stdio.as_ref());
        let role = self.pod_role(req.sandbox_container)?;
        let parsed = spec::parse_spec(&req.oci_spec_json)?;
        let prepared = spec::prepare(parsed, id, &self.policy, role, stdio.terminal)?;
        let seccomp = prepared.spec.linux().as_ref().and_then(|l| l.seccomp().clone());
        let cgroup = ContainerCgroup::new(prepared.cgroup_path.clone(), self.cgroup_mode, id);
        // Never join (nor, on failure, tear down) a cgroup that already has processes:
        // it belongs to someone else, e.g. another container.
        if cgroup.exists() {
            if !cgroup.pids()?.is_empty() {
                return Err(SandboxError::Precondition(format!(
                    "cgroup {} of container {id} already has processes; give each container its own cgroupsPath",
                    prepared.cgroup_path.display()
                )));
            }
        } else {
            cleanup.cgroup = Some(cgroup.clone());
        }
        for (k, v) in &prepared.net_sysctls {
            guest::apply_sysctl(k, v)?;
        }

        let bundle = self.bundle_dir(id);
        cleanup.bundle = Some(bundle.clone());
        std::fs::create_dir_all(&bundle).map_err(io_err(format!("creating bundle {}", bundle.display())))?;
        let json = serde_json::to_vec(&prepared.spec)
            .map_err(|e| SandboxError::Invalid(format!("spec of container {id} cannot be serialized: {e}")))?;
        std::fs::write(bundle.join("config.json"), json)
            .map_err(io_err(format!("writing {}/config.json", bundle.display())))?;

        let (io, child) = make_io(stdio)?;
        let spawned = self.engine.create_init(InitParams {
            container_id: id,
            bundle: &bundle,
            stdio: child,
            terminal: stdio.terminal,
        })?;
        if let Some(m) = spawned.pty_master {
            io.set_pty_master(m);
        }
        let init = Arc::new(Process {
            container_id: id.into(),
            exec_id: String::new(),
            pid: spawned.pid,
            exit: spawned.exit,
            io,
        });
        let container = Arc::new(Container::new(id.into(), bundle, cgroup, seccomp, init, prepared.own_pid_ns));
        container.transition(Transition::Created, || Ok::<(), SandboxError>(()))?;
        lock(&self.containers).insert(id.into(), Slot::Ready(container));
        if req.sandbox_container {
            lock(&self.pod).sandbox_container = Some(id.into());
        }
        log::info!("created container {id} (init pid {})", spawned.pid);
        Ok(())
    }

    fn pod_role(&self, sandbox_container: bool) -> Result<PodRole> {
        let current = lock(&self.pod).sandbox_container.clone();
        if sandbox_container {
            if let Some(existing) = current {
                return Err(SandboxError::Precondition(format!(
                    "the pod already has a sandbox container ({existing})"
                )));
            }
            return Ok(PodRole::Sandbox);
        }
        let Some(sid) = current else { return Ok(PodRole::Member { sandbox_pid: None }) };
        let c = self.get(&sid).map_err(|_| SpecError::SandboxGone)?;
        if c.init.has_exited() {
            return Err(SpecError::SandboxGone.into());
        }
        Ok(PodRole::Member { sandbox_pid: Some(c.init.pid.as_raw()) })
    }

    pub fn start_container(&self, id: &str) -> Result<u32> {
        let c = self.get(id)?;
        c.transition(Transition::Start, || self.engine.start(id).map_err(SandboxError::from))?;
        log::info!("started container {id}");
        Ok(c.init.pid.as_raw() as u32)
    }

    pub fn remove_container(&self, id: &str, timeout: Duration) -> Result<()> {
        let c = self.get(id)?;
        let timeout = if timeout.is_zero() { DEFAULT_REMOVE_TIMEOUT } else { timeout };
        self.kill_and_wait(&c, timeout)?;
        self.oom.check(&c);
        if let Err(e) = self.engine.delete(id) {
            log::warn!("{e}; removing what is left by hand");
            self.engine.forget(id);
        }
        c.cgroup.remove()?;
        for p in c.all_processes() {
            p.io.discard();
        }
        let _ = std::fs::remove_dir_all(&c.bundle);
        lock(&self.containers).remove(id);
        let mut pod = lock(&self.pod);
        if pod.sandbox_container.as_deref() == Some(id) {
            pod.sandbox_container = None;
        }
        log::info!("removed container {id}");
        Ok(())
    }

    /// SIGKILLs everything in the container until the init has exited and the cgroup
    /// is empty, or the deadline passes.
    fn kill_and_wait(&self, c: &Container, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        if c.state() == ContainerState::Paused {
            let _ = c.transition(Transition::Resume, || c.cgroup.freeze(false).map_err(SandboxError::from));
        }
        loop {
            let _ = c.init.signal(&self.reaper, SIGKILL);
            let pids = c.cgroup.pids().unwrap_or_default();
            let _ = self.reaper.signal_many(&pids, SIGKILL);
            let execs_done = c.all_processes().iter().all(|p| p.has_exited());
            if c.init.has_exited() && pids.is_empty() && execs_done {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(SandboxError::Timeout(format!(
                    "container {}: processes still alive {:?} after SIGKILL (init exited: {})",
                    c.id,
                    timeout,
                    c.init.has_exited()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pause_container(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        c.transition(Transition::Pause, || c.cgroup.freeze(true).map_err(SandboxError::from))?;
        Ok(())
    }

    pub fn resume_container(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        c.transition(Transition::Resume, || c.cgroup.freeze(false).map_err(SandboxError::from))?;
        Ok(())
    }

    pub fn update_container(&self, req: &pb::UpdateContainerRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        c.require(Operation::Update)?;
        let resources = spec::parse_resources(&req.resources_json)?;
        c.cgroup.update(&resources)?;
        Ok(())
    }

    pub fn stats_container(&self, id: &str) -> Result<pb::StatsContainerResponse> {
        let c = self.get(id)?;
        Ok(c.cgroup.stats()?)
    }

    pub fn list_processes(&self, id: &str) -> Result<Vec<u32>> {
        let c = self.get(id)?;
        let mut pids: Vec<u32> = c.cgroup.pids()?.into_iter().map(|p| p.as_raw() as u32).collect();
        pids.sort_unstable();
        Ok(pids)
    }

    // ---- processes ----

    pub fn exec_process(&self, req: &pb::ExecProcessRequest) -> Result<u32> {
        let (cid, eid) = (req.container_id.as_str(), req.exec_id.as_str());
        spec::validate_id("exec", eid)?;
        let c = self.get(cid)?;
        let _serial = lock(&self.exec_lock);
        c.require(Operation::Exec)?;
        if c.exec_in_use(eid) {
            return Err(SandboxError::ExecExists { container_id: cid.into(), exec_id: eid.into() });
        }
        let stdio = stdio_request(req.stdio.as_ref());
        let process = spec::prepare_exec_process(spec::parse_process(&req.process_json)?, stdio.terminal)?;
        let process_file = c.bundle.join(format!("exec-{eid}.json"));
        let json = serde_json::to_vec(&process)
            .map_err(|e| SandboxError::Invalid(format!("exec process cannot be serialized: {e}")))?;
        std::fs::write(&process_file, json).map_err(io_err(format!("writing {}", process_file.display())))?;
        let (io, child) = make_io(stdio)?;
        let spawned = self.engine.exec(ExecParams {
            container_id: cid,
            exec_id: eid,
            process_json: &process_file,
            stdio: child,
            terminal: stdio.terminal,
            seccomp: c.seccomp.clone(),
        });
        let _ = std::fs::remove_file(&process_file);
        let spawned = spawned?;
        if let Some(m) = spawned.pty_master {
            io.set_pty_master(m);
        }
        let pid = spawned.pid;
        c.add_exec(Arc::new(Process { container_id: cid.into(), exec_id: eid.into(), pid, exit: spawned.exit, io }));
        log::info!("exec {eid} in container {cid}: pid {pid}");
        Ok(pid.as_raw() as u32)
    }

    pub fn signal_process(&self, req: &pb::SignalProcessRequest) -> Result<()> {
        let (c, p) = self.process(&req.container_id, &req.exec_id)?;
        let signal = i32::try_from(req.signal).map_err(|_| ReaperError::BadSignal(-1)).map_err(ProcessError::from)?;
        if req.all {
            if !req.exec_id.is_empty() {
                return Err(SandboxError::Invalid(
                    "'all' signals every process of the container: use the init's exec id \"\"".into(),
                ));
            }
            let pids = c.cgroup.pids()?;
            self.reaper.signal_many(&pids, signal).map_err(ProcessError::from)?;
            if signal == SIGKILL && c.state() == ContainerState::Paused {
                let _ = c.transition(Transition::Resume, || c.cgroup.freeze(false).map_err(SandboxError::from));
            }
            return Ok(());
        }
        p.signal(&self.reaper, signal)?;
        Ok(())
    }

    /// The process's exit status, once it has exited. When a container's init has
    /// exited and it was not PID 1 of its own PID namespace (it shares the pod's), what
    /// it started lives on, holding its output open: like runc's shim, the agent kills
    /// the rest of the container before the exit is reported, so a stopped container
    /// has no processes and its output ends.
    pub fn wait_process(&self, container_id: &str, exec_id: &str, cancelled: &dyn Fn() -> bool) -> Result<ExitStatus> {
        let (c, p) = self.process(container_id, exec_id)?;
        let status = p.wait(cancelled)?;
        if exec_id.is_empty() && !c.own_pid_ns {
            self.kill_leftovers(&c);
        }
        Ok(status)
    }

    /// SIGKILLs every process left in the container's cgroup until none is left (a
    /// process forking meanwhile is caught on the next pass), for at most a few seconds.
    fn kill_leftovers(&self, c: &Container) {
        let deadline = Instant::now() + LEFTOVER_KILL_TIMEOUT;
        for pass in 0.. {
            let pids = c.cgroup.pids().unwrap_or_default();
            if pids.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                log::warn!("container {}: processes {pids:?} still alive after its init exited and SIGKILL", c.id);
                return;
            }
            if pass == 0 {
                log::info!("container {}: its init exited; killing the {} process(es) it left", c.id, pids.len());
            }
            let _ = self.reaper.signal_many(&pids, SIGKILL);
            std::thread::sleep(Duration::from_millis(20));
        }
    }


    pub fn tty_resize(&self, req: &pb::TtyWinResizeRequest) -> Result<()> {
        let (_, p) = self.process(&req.container_id, &req.exec_id)?;
        let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
        p.io.resize(clamp(req.rows), clamp(req.cols))?;
        Ok(())
    }

    pub fn next_oom_event(&self, cancelled: &dyn Fn() -> bool) -> Result<String> {
        Ok(self.oom.next(cancelled)?)
    }

    pub fn guest_details(&self) -> pb::GuestDetailsResponse {
        guest::details(guest::cgroup_controllers())
    }


    fn require_guest(&self, what: &str) -> Result<()> {
        if self.cfg.guest {
            Ok(())
        } else {
            Err(SandboxError::Precondition(format!(
                "{what}: the agent runs in host test mode and never changes the host's network"
            )))
        }
    }

    pub fn update_interface(&self, iface: &pb::Interface) -> Result<pb::Interface> {
        self.require_guest("UpdateInterface")?;
        Ok(crate::network::update_interface(iface)?)
    }

    pub fn update_routes(&self, routes: &[pb::Route]) -> Result<Vec<pb::Route>> {
        self.require_guest("UpdateRoutes")?;
        Ok(crate::network::update_routes(routes)?)
    }
}

/// Undoes a failed CreateContainer: libcontainer state, cgroup, bundle, the slot.
struct CreateCleanup<'a> {
    sandbox: &'a Sandbox,
    id: &'a str,
    cgroup: Option<ContainerCgroup>,
    bundle: Option<PathBuf>,
    armed: bool,
}

impl Drop for CreateCleanup<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let s = self.sandbox;
        if s.engine.delete(self.id).is_err() {
            s.engine.forget(self.id);
        }
        if let Some(cg) = &self.cgroup {
            if let Err(e) = cg.remove() {
                log::warn!("cleaning up failed container {}: {e}", self.id);
            }
        }
        if let Some(b) = &self.bundle {
            let _ = std::fs::remove_dir_all(b);
        }
        lock(&s.containers).remove(self.id);
    }
}

impl ProcessLookup for Sandbox {
    fn process_io(&self, container_id: &str, exec_id: &str) -> Option<Arc<ProcessIo>> {
        self.get(container_id).ok()?.process(exec_id).map(|p| p.io.clone())
    }
}

impl ContainerSource for Sandbox {
    fn containers(&self) -> Vec<Arc<Container>> {
        lock(&self.containers)
            .values()
            .filter_map(|s| match s {
                Slot::Ready(c) => Some(c.clone()),
                Slot::Creating => None,
            })
            .collect()
    }
}
