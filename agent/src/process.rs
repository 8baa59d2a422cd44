//! One process the agent runs: a container's init (exec id "") or an exec. Holds its
//! pid, where its exit status lands (filled by the reaper) and its stdio ends.
//!
//! Trusts: nothing from requests; ids were validated before a Process is made.

use std::sync::Arc;
use std::time::Duration;

use nix::unistd::Pid;

use crate::reaper::{ExitCell, ExitStatus, Reaper, ReaperError};
use crate::stdio::ProcessIo;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("process {exec_id:?} of container {container_id:?} has already exited")]
    Exited { container_id: String, exec_id: String },
    #[error(transparent)]
    Signal(#[from] ReaperError),
    #[error(transparent)]
    Stdio(#[from] crate::stdio::StdioError),
    #[error("the caller went away while waiting")]
    Cancelled,
}

pub struct Process {
    pub container_id: String,
    pub exec_id: String,
    pub pid: Pid,
    pub exit: Arc<ExitCell>,
    pub io: Arc<ProcessIo>,
}

impl Process {
    pub fn has_exited(&self) -> bool {
        self.exit.is_set()
    }

    pub fn signal(&self, reaper: &Reaper, signal: i32) -> Result<(), ProcessError> {
        reaper.signal(self.pid, &self.exit, signal).map_err(|e| match e {
            ReaperError::AlreadyExited(_) => {
                ProcessError::Exited { container_id: self.container_id.clone(), exec_id: self.exec_id.clone() }
            }
            other => other.into(),
        })
    }

    /// Long-polls for the exit; `cancelled` is asked every second (the RPC's caller
    /// may have gone away).
    pub fn wait(&self, cancelled: &dyn Fn() -> bool) -> Result<ExitStatus, ProcessError> {
        loop {
            if let Some(st) = self.exit.wait_timeout(Duration::from_secs(1)) {
                return Ok(st);
            }
            if cancelled() {
                return Err(ProcessError::Cancelled);
            }
        }
    }
}
