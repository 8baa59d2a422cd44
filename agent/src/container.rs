//! A container's lifecycle as an explicit state machine
//! (creating -> created -> running <-> paused -> stopped), with every transition in
//! `ContainerState::next`, and the container record (init process, execs, cgroup).
//! Operations on the wrong state are errors that name the state.
//!
//! A record is made once libcontainer has created the init (state creating) and moves
//! to created when the agent publishes it.
//! "stopped" is reached when the init process's exit status arrives (from the reaper);
//! `Container::state` applies that transition lazily when it sees the status.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use oci_spec::runtime::LinuxSeccomp;

use crate::cgroup::ContainerCgroup;
use crate::process::Process;

/// How many exited exec processes a container keeps for late WaitProcess calls.
const KEEP_EXITED_EXECS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for ContainerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Creating => "creating",
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        })
    }
}

/// Things that happen to a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Created,
    Start,
    Pause,
    Resume,
    InitExited,
}

/// Operations that need a given state without changing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Exec,
    Update,
}

#[derive(Debug, thiserror::Error)]
#[error("container {id} is {state}; cannot {action}")]
pub struct StateError {
    pub id: String,
    pub state: ContainerState,
    pub action: &'static str,
}

impl ContainerState {
    /// The one place that says which transitions are legal.
    pub fn next(self, t: Transition) -> Option<ContainerState> {
        use ContainerState::*;
        match (self, t) {
            (Creating, Transition::Created) => Some(Created),
            (Created, Transition::Start) => Some(Running),
            (Running, Transition::Pause) => Some(Paused),
            (Paused, Transition::Resume) => Some(Running),
            (Creating | Created | Running | Paused, Transition::InitExited) => Some(Stopped),
            (Stopped, Transition::InitExited) => Some(Stopped),
            _ => None,
        }
    }

    pub fn allows(self, op: Operation) -> bool {
        use ContainerState::*;
        match op {
            Operation::Exec => self == Running,
            Operation::Update => matches!(self, Created | Running | Paused),
        }
    }
}

fn transition_name(t: Transition) -> &'static str {
    match t {
        Transition::Created => "finish creating",
        Transition::Start => "start",
        Transition::Pause => "pause",
        Transition::Resume => "resume",
        Transition::InitExited => "stop",
    }
}

fn operation_name(op: Operation) -> &'static str {
    match op {
        Operation::Exec => "exec a process",
        Operation::Update => "update resources",
    }
}

pub struct Container {
    pub id: String,
    /// The bundle the agent wrote (config.json, exec process files).
    pub bundle: PathBuf,
    pub cgroup: ContainerCgroup,
    /// The container's seccomp profile, re-applied to exec processes.
    pub seccomp: Option<LinuxSeccomp>,
    pub init: Arc<Process>,
    /// The init is PID 1 of its own PID namespace (its exit ends the rest).
    pub own_pid_ns: bool,
    state: Mutex<ContainerState>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    /// Exec ids in creation order, for pruning.
    exec_order: Mutex<Vec<String>>,
    oom_seen: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Container {
    pub fn new(
        id: String,
        bundle: PathBuf,
        cgroup: ContainerCgroup,
        seccomp: Option<LinuxSeccomp>,
        init: Arc<Process>,
        own_pid_ns: bool,
    ) -> Self {
        let oom_seen = cgroup.oom_kills().unwrap_or(0);
        Self {
            id,
            bundle,
            cgroup,
            seccomp,
            init,
            own_pid_ns,
            state: Mutex::new(ContainerState::Creating),
            execs: Mutex::new(HashMap::new()),
            exec_order: Mutex::new(Vec::new()),
            oom_seen: Mutex::new(oom_seen),
        }
    }

    fn refreshed(&self) -> MutexGuard<'_, ContainerState> {
        let mut s = lock(&self.state);
        if self.init.has_exited() {
            *s = s.next(Transition::InitExited).unwrap_or(ContainerState::Stopped);
        }
        s
    }

    pub fn state(&self) -> ContainerState {
        *self.refreshed()
    }

    /// Applies `t` if legal, running `action` first with the state locked; the state
    /// only changes when `action` succeeds.
    pub fn transition<E>(&self, t: Transition, action: impl FnOnce() -> Result<(), E>) -> Result<ContainerState, E>
    where
        E: From<StateError>,
    {
        let mut s = self.refreshed();
        let next =
            s.next(t).ok_or_else(|| StateError { id: self.id.clone(), state: *s, action: transition_name(t) })?;
        action()?;
        *s = next;
        Ok(next)
    }

    /// Checks that `op` is allowed now.
    pub fn require(&self, op: Operation) -> Result<ContainerState, StateError> {
        let s = self.state();
        if s.allows(op) {
            Ok(s)
        } else {
            Err(StateError { id: self.id.clone(), state: s, action: operation_name(op) })
        }
    }

    /// The init process for "", an exec otherwise.
    pub fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() {
            return Some(self.init.clone());
        }
        lock(&self.execs).get(exec_id).cloned()
    }

    /// True when `exec_id` names a live exec (a finished one may be replaced).
    pub fn exec_in_use(&self, exec_id: &str) -> bool {
        lock(&self.execs).get(exec_id).is_some_and(|p| !p.has_exited())
    }

    pub fn add_exec(&self, p: Arc<Process>) {
        let id = p.exec_id.clone();
        let mut execs = lock(&self.execs);
        let mut order = lock(&self.exec_order);
        if let Some(old) = execs.insert(id.clone(), p) {
            old.io.discard();
        }
        order.retain(|e| e != &id);
        order.push(id);
        // Forget the oldest exited execs beyond the limit.
        let exited: Vec<String> =
            order.iter().filter(|e| execs.get(*e).is_some_and(|p| p.has_exited())).cloned().collect();
        if exited.len() > KEEP_EXITED_EXECS {
            for e in &exited[..exited.len() - KEEP_EXITED_EXECS] {
                if let Some(p) = execs.remove(e) {
                    p.io.discard();
                }
                order.retain(|o| o != e);
            }
        }
    }

    pub fn all_processes(&self) -> Vec<Arc<Process>> {
        let mut v = vec![self.init.clone()];
        v.extend(lock(&self.execs).values().cloned());
        v
    }

    /// True when the cgroup's OOM kill counter grew since the last call.
    pub fn poll_oom(&self) -> bool {
        let Some(now) = self.cgroup.oom_kills() else { return false };
        let mut seen = lock(&self.oom_seen);
        if now > *seen {
            *seen = now;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::ContainerState::*;
    use super::*;

    #[test]
    fn legal_transitions() {
        assert_eq!(Creating.next(Transition::Created), Some(Created));
        assert_eq!(Created.next(Transition::Start), Some(Running));
        assert_eq!(Running.next(Transition::Pause), Some(Paused));
        assert_eq!(Paused.next(Transition::Resume), Some(Running));
        for s in [Creating, Created, Running, Paused, Stopped] {
            assert_eq!(s.next(Transition::InitExited), Some(Stopped));
        }
    }

    #[test]
    fn illegal_transitions_are_refused() {
        assert_eq!(Running.next(Transition::Start), None, "double start");
        assert_eq!(Stopped.next(Transition::Start), None);
        assert_eq!(Created.next(Transition::Pause), None);
        assert_eq!(Paused.next(Transition::Pause), None);
        assert_eq!(Running.next(Transition::Resume), None);
        assert_eq!(Stopped.next(Transition::Resume), None);
        assert_eq!(Created.next(Transition::Created), None);
    }

    #[test]
    fn operations_need_the_right_state() {
        assert!(Running.allows(Operation::Exec));
        assert!(!Created.allows(Operation::Exec));
        assert!(!Paused.allows(Operation::Exec));
        assert!(Paused.allows(Operation::Update));
        assert!(!Stopped.allows(Operation::Update));
        let e = StateError { id: "c1".into(), state: Stopped, action: "exec a process" };
        assert_eq!(e.to_string(), "container c1 is stopped; cannot exec a process");
    }
}
