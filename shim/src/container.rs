//! Task state kept by the shim: each container with its init process and execs, and
//! the state machine of a process with its transitions and the checks of each task
//! call in one place (youki's shape: `transition` and `Status::allows`). A process is
//! `Creating` or `Starting` while the guest call that makes or starts it runs unlocked,
//! so a concurrent call sees that and not a stale state. Operations on the wrong state
//! are errors, not surprises.
//!
//! ```text
//! Creating -Created-> Created -Start-> Starting -Started-> Running <-Pause/Resume-> Paused
//!     \                  \                 \                  \                   /
//!      `------------------`-----------------`------ Exit -----`---------------> Stopped
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::io::StdioPaths;
use crate::pod::{HostMounts, ProcessStdio};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The container is being made (mounts, the guest's create): its id is taken.
    Creating,
    Created,
    /// The guest is starting the process.
    Starting,
    Running,
    Paused,
    Stopped,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("cannot {action} a process that is {from:?}")]
pub struct TransitionError {
    pub action: &'static str,
    pub from: Status,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The guest created the container.
    Created,
    /// A start call claims a created process.
    Start,
    /// The guest started it.
    Started,
    Pause,
    Resume,
    /// The process ended, will never run (failed start, killed or deleted before it
    /// ran), or its VM is gone.
    Exit,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Created => "finish creating",
            Action::Start => "start",
            Action::Started => "finish starting",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Exit => "stop",
        }
    }
}

/// The one place status changes are decided.
pub fn transition(from: Status, action: Action) -> Result<Status, TransitionError> {
    use Action::*;
    use Status::*;
    match (from, action) {
        (Creating, Action::Created) => Ok(Status::Created),
        (Status::Created, Start) => Ok(Starting),
        (Starting, Started) => Ok(Running),
        (Running, Pause) => Ok(Paused),
        (Paused, Resume) => Ok(Running),
        (Creating | Status::Created | Starting | Running | Paused, Exit) => Ok(Stopped),
        (from, a) => Err(TransitionError { action: a.name(), from }),
    }
}

/// A task call, as far as the state of its process decides whether it may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Start,
    Kill,
    Delete,
    /// Adding an exec (to the container's init process).
    Exec,
    Pause,
    Resume,
    /// Pids, stats, update, resize: calls that ask the guest about the container.
    Query,
}

/// Why a call may not go on: the process has finished (containerd's NotFound for a
/// kill), or it is in a state the call does not apply to (FailedPrecondition).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("it has already finished")]
    Finished,
    #[error("it is {0}")]
    Wrong(&'static str),
}

impl Status {
    fn describe(self) -> &'static str {
        match self {
            Status::Creating => "still being created",
            Status::Created => "created and not started",
            Status::Starting => "being started",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        }
    }

    /// The checks of each task call, in one place.
    pub fn allows(self, op: Operation) -> Result<(), Refusal> {
        use Operation::*;
        use Status::*;
        let ok = match op {
            Operation::Start => self == Created,
            Kill if self == Stopped => return Err(Refusal::Finished),
            Kill => self != Creating,
            Delete => matches!(self, Created | Stopped),
            Exec | Pause => self == Running,
            Resume => self == Paused,
            Query => !matches!(self, Creating | Stopped),
        };
        if ok {
            Ok(())
        } else {
            Err(Refusal::Wrong(self.describe()))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

impl Exit {
    /// An exit with `status`, now.
    pub fn now(status: u32) -> Self {
        Self { status, at: SystemTime::now() }
    }
}

/// Where a process's exit is published once (the first record wins); any number of waiters.
pub type ExitCell = wisp_protocols::exit::ExitCell<Exit>;

pub struct Process {
    pub exec_id: String,
    /// The process's PID in the guest, once started.
    pub guest_pid: u32,
    pub status: Status,
    pub stdio: StdioPaths,
    pub io: Option<Arc<Mutex<Box<dyn ProcessStdio>>>>,
    pub exit: Arc<ExitCell>,
    /// For execs: the OCI process JSON from containerd.
    pub spec: Vec<u8>,
}

impl Process {
    /// An exec as containerd adds it: created, not yet in the guest.
    pub fn new(exec_id: &str, stdio: StdioPaths, spec: Vec<u8>) -> Self {
        Self { exec_id: exec_id.into(), guest_pid: 0, status: Status::Created, stdio, io: None, exit: Arc::default(), spec }
    }

    /// A container's init process while the container is being created.
    pub fn creating(stdio: StdioPaths) -> Self {
        Self { status: Status::Creating, ..Self::new("", stdio, Vec::new()) }
    }

    pub fn apply(&mut self, action: Action) -> Result<(), TransitionError> {
        self.status = transition(self.status, action)?;
        Ok(())
    }

    /// The process ends with `status`, unless it already has: the first end stands (a
    /// VM gone and the guest's own exit report can race). Returns the exit if this call
    /// ended it, for the caller to publish.
    pub fn end(&mut self, status: u32) -> Option<Exit> {
        match transition(self.status, Action::Exit) {
            Ok(next) => {
                self.status = next;
                Some(self.exit.set(Exit::now(status)))
            }
            // Exit is refused only from Stopped.
            Err(_) => None,
        }
    }
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub init: Process,
    pub execs: HashMap<String, Process>,
    /// Its rootfs and volumes on the host (dropping them unmounts); None while Creating.
    pub mounts: Option<Box<dyn HostMounts>>,
}

impl Container {
    pub fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legal_transitions() {
        assert_eq!(transition(Status::Creating, Action::Created), Ok(Status::Created));
        assert_eq!(transition(Status::Created, Action::Start), Ok(Status::Starting));
        assert_eq!(transition(Status::Starting, Action::Started), Ok(Status::Running));
        assert_eq!(transition(Status::Running, Action::Pause), Ok(Status::Paused));
        assert_eq!(transition(Status::Paused, Action::Resume), Ok(Status::Running));
        for from in [Status::Creating, Status::Created, Status::Starting, Status::Running, Status::Paused] {
            assert_eq!(transition(from, Action::Exit), Ok(Status::Stopped), "{from:?}");
        }
    }

    #[test]
    fn illegal_transitions_are_errors() {
        assert!(transition(Status::Created, Action::Started).is_err());
        assert!(transition(Status::Starting, Action::Start).is_err());
        assert!(transition(Status::Running, Action::Start).is_err());
        assert!(transition(Status::Stopped, Action::Start).is_err());
        assert!(transition(Status::Stopped, Action::Started).is_err());
        assert!(transition(Status::Created, Action::Pause).is_err());
        assert!(transition(Status::Starting, Action::Pause).is_err());
        assert!(transition(Status::Running, Action::Resume).is_err());
        assert!(transition(Status::Running, Action::Created).is_err());
        let e = transition(Status::Stopped, Action::Exit).unwrap_err();
        assert_eq!(e.to_string(), "cannot stop a process that is Stopped");
    }

    #[test]
    fn each_call_is_checked_against_the_status() {
        use Operation::*;
        let all = [Status::Creating, Status::Created, Status::Starting, Status::Running, Status::Paused, Status::Stopped];
        let allowed = |op| all.iter().copied().filter(|s| s.allows(op).is_ok()).collect::<Vec<_>>();
        assert_eq!(allowed(Start), [Status::Created]);
        assert_eq!(allowed(Kill), [Status::Created, Status::Starting, Status::Running, Status::Paused]);
        assert_eq!(allowed(Delete), [Status::Created, Status::Stopped]);
        assert_eq!(allowed(Exec), [Status::Running]);
        assert_eq!(allowed(Pause), [Status::Running]);
        assert_eq!(allowed(Resume), [Status::Paused]);
        assert_eq!(allowed(Query), [Status::Created, Status::Starting, Status::Running, Status::Paused]);
        assert_eq!(Status::Stopped.allows(Kill), Err(Refusal::Finished));
        assert_eq!(Status::Running.allows(Delete).unwrap_err().to_string(), "it is running");
        assert_eq!(Status::Creating.allows(Kill).unwrap_err().to_string(), "it is still being created");
    }

    #[test]
    fn the_first_end_of_a_process_stands() {
        let mut p = Process::new("e1", StdioPaths::default(), Vec::new());
        p.apply(Action::Start).unwrap();
        p.apply(Action::Started).unwrap();
        let first = p.end(255).expect("a running process ends");
        assert_eq!((p.status, first.status), (Status::Stopped, 255));
        assert_eq!(p.end(0), None, "a second end is not a new exit");
        assert_eq!(p.exit.get().map(|e| e.status), Some(255));
    }
}
