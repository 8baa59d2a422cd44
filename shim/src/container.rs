//! Task state kept by the shim: each container with its init process and execs, and
//! the state machine `created -> running <-> paused -> stopped` with its transitions in
//! one place. Operations on the wrong state are errors, not surprises.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::io::{ProcessIo, StdioPaths};
use crate::mounts::ContainerMounts;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
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
    Start,
    Pause,
    Resume,
    Exit,
}

impl Action {
    fn name(self) -> &'static str {
        match self {
            Action::Start => "start",
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
        (Created, Start) => Ok(Running),
        (Running, Pause) => Ok(Paused),
        (Paused, Resume) => Ok(Running),
        (Created | Running | Paused, Exit) => Ok(Stopped),
        (from, a) => Err(TransitionError { action: a.name(), from }),
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
    pub io: Option<Arc<Mutex<ProcessIo>>>,
    pub exit: Arc<ExitCell>,
    /// For execs: the OCI process JSON from containerd.
    pub spec: Vec<u8>,
}

impl Process {
    pub fn new(exec_id: &str, stdio: StdioPaths, spec: Vec<u8>) -> Self {
        Self { exec_id: exec_id.into(), guest_pid: 0, status: Status::Created, stdio, io: None, exit: Arc::default(), spec }
    }

    pub fn apply(&mut self, action: Action) -> Result<(), TransitionError> {
        self.status = transition(self.status, action)?;
        Ok(())
    }
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub init: Process,
    pub execs: HashMap<String, Process>,
    pub mounts: ContainerMounts,
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
        assert_eq!(transition(Status::Created, Action::Start), Ok(Status::Running));
        assert_eq!(transition(Status::Running, Action::Pause), Ok(Status::Paused));
        assert_eq!(transition(Status::Paused, Action::Resume), Ok(Status::Running));
        assert_eq!(transition(Status::Paused, Action::Exit), Ok(Status::Stopped));
        assert_eq!(transition(Status::Created, Action::Exit), Ok(Status::Stopped));
    }

    #[test]
    fn illegal_transitions_are_errors() {
        assert!(transition(Status::Running, Action::Start).is_err());
        assert!(transition(Status::Stopped, Action::Start).is_err());
        assert!(transition(Status::Created, Action::Pause).is_err());
        assert!(transition(Status::Running, Action::Resume).is_err());
        let e = transition(Status::Stopped, Action::Exit).unwrap_err();
        assert_eq!(e.to_string(), "cannot stop a process that is Stopped");
    }
}
