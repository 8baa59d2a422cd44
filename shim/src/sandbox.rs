//! One pod's tasks: containerd's task semantics over the pod's guest (`pod.rs`), with
//! the process state machine of `container.rs`. The task service (`service.rs`) is a
//! thin layer over these operations; the VM itself is behind `GuestPod` (`vmpod.rs`).
//!
//! Rules: the first container's Create boots the pod's VM; a Create that fails leaves
//! nothing (its mounts are dropped, the container is removed from the guest, and the VM
//! is shut down if no other container uses it); a VM that ends turns every live process
//! into an exit with status 255, so no Wait hangs; a start that fails ends its process
//! with 126, waking its waiters; the last container's Delete shuts the VM down and lets
//! the shim exit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use containerd_shim_protos::api::Mount;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused, TaskResumed,
    TaskStart,
};
use containerd_shim_protos::topics;
use wisp_protocols::agent::StatsContainerResponse;

use crate::container::{Action, Container, Exit, Operation, Process, Refusal, Status};
use crate::events::{timestamp, EventSink};
use crate::io::StdioPaths;
use crate::pod::{Boot, GuestPod, NewContainer, PodEngine, ProcessStdio, TaskError};
use crate::spec::BundleSpec;

/// Exit status reported for processes whose VM died under them.
pub const VM_GONE_STATUS: u32 = 255;
/// The exit status of a process that could not be started (or was deleted before it
/// ran); like a shell's "cannot execute".
pub const START_FAILED_STATUS: u32 = 126;
/// How long output may take to drain after a process exits before TaskExit is sent.
const OUTPUT_DRAIN: Duration = Duration::from_secs(30);
/// OOM events passed on per second, and in a burst.
const OOM_EVENTS_PER_SEC: u32 = 10;
const OOM_EVENTS_BURST: u32 = 20;

#[derive(Default)]
struct State {
    /// The pod's VM, from the first Create until it is shut down.
    guest: Option<Arc<dyn GuestPod>>,
    /// Set when the VM ended on its own; the reason, for error messages.
    vm_gone: Option<String>,
    /// Set by the call that shuts the pod down for good (`shut_down_and_exit`).
    shutting_down: bool,
    containers: HashMap<String, Container>,
}

pub struct Sandbox {
    pub id: String,
    /// containerd's namespace of the shim's tasks (for `binary://` logging programs).
    namespace: String,
    events: Arc<dyn EventSink>,
    engine: Arc<dyn PodEngine>,
    state: Mutex<State>,
    /// Held while the VM boots, so concurrent first Creates boot it once.
    booting: Mutex<()>,
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

fn who(cid: &str, eid: &str) -> String {
    if eid.is_empty() {
        format!("container {cid}")
    } else {
        format!("exec {eid} of {cid}")
    }
}

/// A call refused by the state machine, in containerd's classes.
fn refused(cid: &str, eid: &str, op: Operation, r: Refusal) -> TaskError {
    let msg = format!("cannot {} {}: {r}", format!("{op:?}").to_lowercase(), who(cid, eid));
    match r {
        Refusal::Finished => TaskError::NotFound(msg),
        Refusal::Wrong(_) => TaskError::FailedPrecondition(msg),
    }
}

fn process_mut<'a>(st: &'a mut State, cid: &str, eid: &str) -> Result<&'a mut Process, TaskError> {
    let c = st.containers.get_mut(cid).ok_or_else(|| TaskError::NotFound(format!("container {cid} not found")))?;
    c.process_mut(eid).ok_or_else(|| TaskError::NotFound(format!("exec {eid} of container {cid} not found")))
}

impl Sandbox {
    pub fn new(
        id: &str,
        namespace: &str,
        events: Arc<dyn EventSink>,
        done: Arc<crate::container::ExitCell>,
        engine: Arc<dyn PodEngine>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            id: id.into(),
            namespace: namespace.into(),
            events,
            engine,
            state: Mutex::new(State::default()),
            booting: Mutex::new(()),
            me: me.clone(),
            done,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn guest(&self) -> Result<Arc<dyn GuestPod>, TaskError> {
        let st = self.lock();
        match (&st.guest, &st.vm_gone) {
            (_, Some(why)) => Err(TaskError::FailedPrecondition(format!("the pod's VM is gone: {why}"))),
            (Some(g), None) => Ok(g.clone()),
            (None, None) => Err(TaskError::FailedPrecondition("the pod's VM is not running".into())),
        }
    }

    /// Runs `f` on the process if `op` is allowed in its status; returns what `f` returns.
    fn checked<T>(
        &self,
        cid: &str,
        eid: &str,
        op: Operation,
        f: impl FnOnce(&mut Process) -> Result<T, TaskError>,
    ) -> Result<T, TaskError> {
        let mut st = self.lock();
        let p = process_mut(&mut st, cid, eid)?;
        p.status.allows(op).map_err(|r| refused(cid, eid, op, r))?;
        f(p)
    }

    // ---- the VM ----

    /// The pod's VM, booted for `req` if this is the pod's first container; true when
    /// this call booted it.
    fn guest_for(&self, req: &CreateRequest, spec: &BundleSpec) -> Result<(Arc<dyn GuestPod>, bool), TaskError> {
        let _boot = self.booting.lock().unwrap_or_else(|e| e.into_inner());
        {
            let st = self.lock();
            if let Some(why) = &st.vm_gone {
                return Err(TaskError::FailedPrecondition(format!("the pod's VM is gone: {why}")));
            }
            if let Some(g) = &st.guest {
                if !spec.hooks.is_empty() {
                    log::warn!(
                        "container {}: the hooks in its spec are not run: wisp runs a pod's host-side hooks \
                         (createRuntime, poststop) for its sandbox container only",
                        req.id
                    );
                }
                return Ok((g.clone(), false));
            }
        }
        let config = crate::options::sandbox_config(req.config_path.clone(), &spec.annotations)
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        config.check_host_files().map_err(|e| TaskError::FailedPrecondition(e.to_string()))?;
        let me = self.me.clone();
        let on_exit = Box::new(move |why| {
            if let Some(sb) = me.upgrade() {
                sb.vm_ended(why);
            }
        });
        let boot = Boot { sandbox_id: &self.id, namespace: &self.namespace, config, spec, bundle: &req.bundle };
        let guest = self.engine.boot(boot, on_exit)?;
        self.lock().guest = Some(guest.clone());
        self.watch_oom(guest.clone());
        Ok((guest, true))
    }

    /// Passes the guest's OOM events on to containerd: only for this sandbox's own
    /// containers, and at most `OOM_EVENTS_PER_SEC` (burst `OOM_EVENTS_BURST`), so a
    /// hostile agent cannot flood containerd with events or name other pods' containers.
    fn watch_oom(&self, guest: Arc<dyn GuestPod>) {
        let me = self.me.clone();
        std::thread::spawn(move || {
            let mut limit = crate::bounds::RateLimit::new(OOM_EVENTS_PER_SEC, OOM_EVENTS_BURST);
            while let Some(cid) = guest.next_oom_event() {
                let Some(sb) = me.upgrade() else { return };
                let known = sb.lock().containers.contains_key(&cid);
                if !known {
                    let id = crate::bounds::guest_text(&cid, 128, false);
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
                log::info!("OOM kill in container {cid}");
                sb.events.publish(
                    topics::TASK_OOM_EVENT_TOPIC,
                    Box::new(TaskOOM { container_id: cid, ..Default::default() }),
                );
            }
        });
    }

    /// The VM ended by itself: every live process exits with VM_GONE_STATUS. A container
    /// still being created is left to its Create, which fails (or finds the VM gone).
    fn vm_ended(&self, why: String) {
        let mut st = self.lock();
        if st.guest.is_none() {
            return;
        }
        st.vm_gone = Some(why);
        let mut exits = Vec::new();
        for c in st.containers.values_mut() {
            for p in std::iter::once(&mut c.init).chain(c.execs.values_mut()) {
                if p.status == Status::Creating {
                    continue;
                }
                // A process that never started (guest pid 0) gets no TaskExit: only
                // its waiters learn the status.
                if let Some(e) = p.end(VM_GONE_STATUS).filter(|_| p.guest_pid != 0) {
                    exits.push((c.id.clone(), p.exec_id.clone(), e));
                }
            }
        }
        drop(st);
        for (cid, eid, e) in exits {
            self.publish_exit(&cid, &eid, e);
        }
    }

    /// Shuts the VM down (if any) and forgets it.
    fn teardown(&self) {
        let guest = self.lock().guest.take();
        if let Some(g) = guest {
            g.shutdown();
        }
    }

    /// Shuts the VM down, then lets the shim exit. The first call does both; a call made
    /// while it is at work returns at once and leaves the exit to it. The shim must not
    /// exit early: once `done` is set its ttrpc server reads no more requests but cannot
    /// close a connection while a call on it (the teardown) still runs, so containerd's
    /// next call gets no answer; containerd 2.4 fails RemovePodSandbox when the Shutdown
    /// it sends after its Delete is not answered within 3 s.
    fn shut_down_and_exit(&self) {
        let guest = {
            let mut st = self.lock();
            if std::mem::replace(&mut st.shutting_down, true) {
                return;
            }
            st.guest.take()
        };
        if let Some(g) = guest {
            g.shutdown();
        }
        self.done.set(Exit::now(0));
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
        crate::mounts::check_bind_sources(&spec.binds)
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        // The id is taken from here on: a concurrent Create of it is refused.
        {
            let mut st = self.lock();
            if st.containers.contains_key(&req.id) {
                return Err(TaskError::AlreadyExists(format!("container {} already exists", req.id)));
            }
            let slot = Container {
                id: req.id.clone(),
                bundle: req.bundle.clone(),
                init: Process::creating(req.stdio.clone()),
                execs: HashMap::new(),
                mounts: None,
            };
            st.containers.insert(req.id.clone(), slot);
        }
        let mut booted = false;
        let result = self.create_in_slot(&req, &spec, &mut booted);
        if result.is_err() {
            let left = {
                let mut st = self.lock();
                if let Some(mut slot) = st.containers.remove(&req.id) {
                    // Anyone already waiting on it wakes up.
                    slot.init.end(START_FAILED_STATUS);
                }
                st.containers.is_empty()
            };
            if booted && left {
                self.teardown();
            }
        }
        result
    }

    /// Create's work once the id is taken: the VM, the mounts, the container in the
    /// guest, its stdio. Each step's failure drops what the steps before it made.
    fn create_in_slot(&self, req: &CreateRequest, spec: &BundleSpec, booted: &mut bool) -> Result<(), TaskError> {
        let (guest, first) = self.guest_for(req, spec)?;
        *booted = first;
        let new =
            NewContainer { id: &req.id, spec, bundle: &req.bundle, rootfs: &req.rootfs, stdio: &req.stdio };
        let (mounts, guest_spec) = guest.mount_container(&new)?;
        guest.create_container(&new, guest_spec)?;
        let io = match guest.attach_stdio(&req.id, "", &req.stdio) {
            Ok(io) => io,
            Err(e) => {
                if let Err(rm) = guest.remove_container(&req.id) {
                    log::warn!("container {}: removing it from the guest after a failed create: {rm}", req.id);
                }
                return Err(e);
            }
        };
        {
            let mut st = self.lock();
            if let Some(why) = st.vm_gone.clone() {
                return Err(TaskError::FailedPrecondition(format!(
                    "the pod's VM ended while container {} was being created: {why}",
                    req.id
                )));
            }
            let c = st.containers.get_mut(&req.id).ok_or_else(|| {
                TaskError::FailedPrecondition(format!("the pod shut down while container {} was being created", req.id))
            })?;
            c.init.apply(Action::Created).map_err(|t| TaskError::FailedPrecondition(t.to_string()))?;
            c.init.io = Some(Arc::new(Mutex::new(io)));
            c.mounts = Some(mounts);
        }
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

    /// Starts a container's init process or an exec; returns the pid reported to containerd.
    pub fn start(&self, cid: &str, eid: &str) -> Result<u32, TaskError> {
        self.checked(cid, eid, Operation::Start, |_| Ok(()))?;
        let guest = self.guest()?;
        let (stdio, spec) = self.checked(cid, eid, Operation::Start, |p| {
            p.apply(Action::Start).map_err(|t| TaskError::FailedPrecondition(t.to_string()))?;
            Ok((p.stdio.clone(), p.spec.clone()))
        })?;
        let started = self.start_in_guest(guest.as_ref(), cid, eid, &stdio, &spec);
        {
            let mut st = self.lock();
            let p = process_mut(&mut st, cid, eid)?;
            match started {
                Err(e) => {
                    // The process will never run: it is stopped, and whoever waits for
                    // it (a Wait call holds a ttrpc worker) wakes up now, not never.
                    p.end(START_FAILED_STATUS);
                    return Err(e);
                }
                Ok((guest_pid, io)) => {
                    p.guest_pid = guest_pid;
                    if io.is_some() {
                        p.io = io.map(|io| Arc::new(Mutex::new(io)));
                    }
                    // Only an end can have moved it from Starting: its VM ended meanwhile.
                    p.apply(Action::Started).map_err(|t| {
                        TaskError::FailedPrecondition(format!("{}: {t} (the pod's VM ended)", who(cid, eid)))
                    })?;
                }
            }
        }
        self.spawn_waiter(guest, cid, eid);
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

    /// Starts the container's init or an exec in the guest; returns the guest pid, and
    /// for an exec its stdio.
    fn start_in_guest(
        &self,
        guest: &dyn GuestPod,
        cid: &str,
        eid: &str,
        stdio: &StdioPaths,
        spec: &[u8],
    ) -> Result<(u32, Option<Box<dyn ProcessStdio>>), TaskError> {
        if eid.is_empty() {
            return Ok((guest.start_container(cid)?, None));
        }
        let pid = guest.exec_process(cid, eid, spec, stdio)?;
        match guest.attach_stdio(cid, eid, stdio) {
            Ok(io) => Ok((pid, Some(io))),
            Err(e) => {
                // Without its stdio the exec is not what containerd asked for: end it.
                if let Err(k) = guest.signal_process(cid, eid, libc::SIGKILL as u32, false) {
                    log::warn!("{}: killing it after its stdio failed: {k}", who(cid, eid));
                }
                Err(e)
            }
        }
    }

    /// Long-polls the guest for the process's exit, drains its output, then records the
    /// exit and publishes TaskExit. A guest gone counts as 255.
    fn spawn_waiter(&self, guest: Arc<dyn GuestPod>, cid: &str, eid: &str) {
        let me = self.me.clone();
        let (cid, eid) = (cid.to_string(), eid.to_string());
        std::thread::spawn(move || {
            let status = guest.wait_process(&cid, &eid).unwrap_or(VM_GONE_STATUS);
            drop(guest);
            let Some(sb) = me.upgrade() else { return };
            let io = process_mut(&mut sb.lock(), &cid, &eid).ok().and_then(|p| p.io.clone());
            if let Some(io) = io {
                let drained = io.lock().unwrap_or_else(|e| e.into_inner()).wait_output(OUTPUT_DRAIN);
                if !drained {
                    log::warn!(
                        "{cid}/{eid}: output still flowing {OUTPUT_DRAIN:?} after exit; reporting the exit anyway"
                    );
                }
            }
            let exit = process_mut(&mut sb.lock(), &cid, &eid).ok().and_then(|p| p.end(status));
            if let Some(e) = exit {
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
            c.init.status.allows(Operation::Exec).map_err(|r| refused(cid, "", Operation::Exec, r))?;
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

    /// Deletes an exec or a container (whose processes must have stopped, or never
    /// started). Deleting the last container shuts the VM down.
    pub fn delete(&self, cid: &str, eid: &str) -> Result<(u32, Exit), TaskError> {
        if !eid.is_empty() {
            let mut p = {
                let mut st = self.lock();
                process_mut(&mut st, cid, eid)?
                    .status
                    .allows(Operation::Delete)
                    .map_err(|r| refused(cid, eid, Operation::Delete, r))?;
                let c = st.containers.get_mut(cid).ok_or_else(|| TaskError::NotFound(cid.into()))?;
                c.execs.remove(eid).ok_or_else(|| TaskError::NotFound(eid.into()))?
            };
            // An exec deleted without ever running ends here, waking its waiters.
            let exit = p.end(START_FAILED_STATUS).or_else(|| p.exit.get());
            return Ok((std::process::id(), exit.unwrap_or_else(|| Exit::now(START_FAILED_STATUS))));
        }
        // Out of the table first: a concurrent call on it finds nothing.
        let mut c = {
            let mut st = self.lock();
            process_mut(&mut st, cid, "")?
                .status
                .allows(Operation::Delete)
                .map_err(|r| refused(cid, "", Operation::Delete, r))?;
            st.containers.remove(cid).ok_or_else(|| TaskError::NotFound(cid.into()))?
        };
        if let Ok(guest) = self.guest() {
            if let Err(e) = guest.remove_container(cid) {
                log::warn!("removing {cid} in the guest: {e}");
            }
        }
        // A container deleted without ever running ends with 0 (as runc's shim has it).
        let exit = c.init.end(0).or_else(|| c.init.exit.get()).unwrap_or_else(|| Exit::now(0));
        if let Some(io) = c.init.io.take() {
            io.lock().unwrap_or_else(|e| e.into_inner()).close_stdin();
        }
        drop(c.mounts.take());
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
            self.shut_down_and_exit();
        }
        Ok((std::process::id(), exit))
    }

    pub fn kill(&self, cid: &str, eid: &str, signal: u32, all: bool) -> Result<(), TaskError> {
        // A container never started: nothing runs in the guest yet; it just ends.
        let never_started = self.checked(cid, eid, Operation::Kill, |p| {
            Ok(if eid.is_empty() && p.status == Status::Created { p.end(128 + signal) } else { None })
        })?;
        if let Some(exit) = never_started {
            self.publish_exit(cid, eid, exit);
            return Ok(());
        }
        let guest = self.guest()?;
        guest.signal_process(cid, eid, signal, all).map_err(|e| match e {
            // The VM ended under the call: the process is gone with it.
            TaskError::Internal(msg) => match self.lock().vm_gone.clone() {
                Some(why) => TaskError::NotFound(format!("process {cid}/{eid}: the VM ended ({why})")),
                None => TaskError::Internal(msg),
            },
            other => other,
        })
    }

    pub fn wait(&self, cid: &str, eid: &str) -> Result<Exit, TaskError> {
        let cell = process_mut(&mut self.lock(), cid, eid)?.exit.clone();
        Ok(cell.wait())
    }

    pub fn state(&self, cid: &str, eid: &str) -> Result<(Status, StdioPaths, Option<Exit>, PathBuf), TaskError> {
        let st = self.lock();
        let c = st.containers.get(cid).ok_or_else(|| TaskError::NotFound(format!("container {cid} not found")))?;
        let p = c.process(eid).ok_or_else(|| TaskError::NotFound(format!("exec {eid} of {cid} not found")))?;
        Ok((p.status, p.stdio.clone(), p.exit.get(), c.bundle.clone()))
    }

    pub fn pause(&self, cid: &str, pause: bool) -> Result<(), TaskError> {
        let (op, action) = if pause { (Operation::Pause, Action::Pause) } else { (Operation::Resume, Action::Resume) };
        self.checked(cid, "", op, |_| Ok(()))?;
        let guest = self.guest()?;
        if pause {
            guest.pause_container(cid)?;
        } else {
            guest.resume_container(cid)?;
        }
        // The process may have ended during the call: then the change is refused.
        let mut st = self.lock();
        process_mut(&mut st, cid, "")?.apply(action).map_err(|t| TaskError::FailedPrecondition(t.to_string()))?;
        drop(st);
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

    /// The guest, for a call that asks it about an existing process.
    fn query(&self, cid: &str, eid: &str) -> Result<Arc<dyn GuestPod>, TaskError> {
        self.checked(cid, eid, Operation::Query, |_| Ok(()))?;
        self.guest()
    }

    pub fn pids(&self, cid: &str) -> Result<Vec<u32>, TaskError> {
        self.query(cid, "")?.list_processes(cid)
    }

    pub fn stats(&self, cid: &str) -> Result<StatsContainerResponse, TaskError> {
        self.query(cid, "")?.stats_container(cid)
    }

    pub fn update(&self, cid: &str, resources_json: Vec<u8>) -> Result<(), TaskError> {
        self.query(cid, "")?.update_container(cid, resources_json)
    }

    pub fn resize_pty(&self, cid: &str, eid: &str, width: u32, height: u32) -> Result<(), TaskError> {
        self.query(cid, eid)?.resize_pty(cid, eid, width, height)
    }

    pub fn close_stdin(&self, cid: &str, eid: &str) -> Result<(), TaskError> {
        let io = process_mut(&mut self.lock(), cid, eid)?.io.clone();
        if let Some(io) = io {
            io.lock().unwrap_or_else(|e| e.into_inner()).close_stdin();
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.lock().containers.is_empty()
    }

    /// Shutdown: the VM goes and the shim exits, unless another call is already shutting
    /// the pod down (then that call lets the shim exit when it is done). Containers still
    /// left (containerd only asks when there are none) go too: every process still live
    /// ends with VM_GONE_STATUS so no Wait hangs.
    pub fn shutdown_now(&self) {
        let containers: Vec<Container> = self.lock().containers.drain().map(|(_, c)| c).collect();
        for mut c in containers {
            for p in std::iter::once(&mut c.init).chain(c.execs.values_mut()) {
                p.end(VM_GONE_STATUS);
            }
            drop(c.mounts.take());
        }
        self.shut_down_and_exit();
    }
}

#[cfg(test)]
mod tests;
