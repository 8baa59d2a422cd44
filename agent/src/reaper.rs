//! The one place that reaps whichever of the agent's children has exited (`waitpid(-1)`).
//! The only other waits are for one known pid, under the spawn guard (below): the spawn
//! helper's (`spawn`) and libcontainer's intermediate process's.
//!
//! The agent is PID 1 in the guest (a child subreaper on a host), so every orphan of
//! every container ends up as its child. A blind `waitpid(-1)` would steal exit
//! statuses that their owners wait for, so:
//! - one reaper thread blocks in `waitid(P_ALL, WEXITED | WNOWAIT)` (which reaps
//!   nothing), then takes the reap lock in write mode and reaps with
//!   `waitpid(-1, WNOHANG)`, handing each status to the `ExitCell` registered for that
//!   pid, or dropping it when nobody registered it (an orphan);
//! - process creation holds the same lock in write mode (`SpawnGuard`) from fork to
//!   registration of the new pid, so libcontainer's own `waitpid` on its intermediate
//!   process and the spawner's wait on its helper cannot race the reaper, and a new
//!   process cannot be reaped before its owner is registered;
//! - signalling a pid holds the lock in read mode and checks the cell first, so a
//!   reaped (and possibly reused) pid is never signalled.
//!
//! Trusts: the kernel. Exit statuses are reported like runc: the exit code, or
//! 128 + signal number for a signalled process.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("process {0} has already exited")]
    AlreadyExited(i32),
    #[error("signal {signal} to process {pid}: {source}")]
    Signal { pid: i32, signal: i32, source: Errno },
    #[error("signal number {0} is not a valid signal")]
    BadSignal(i32),
}

/// How a process ended, as runc reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, or 128 + signal for a signalled process.
    pub status: i32,
    pub at: SystemTime,
}

impl ExitStatus {
    /// Maps a wait status to runc's exit status; `None` for stop/continue reports.
    pub fn from_wait(ws: WaitStatus) -> Option<Self> {
        let status = match ws {
            WaitStatus::Exited(_, code) => code,
            WaitStatus::Signaled(_, sig, _) => 128 + sig as i32,
            _ => return None,
        };
        Some(Self { status, at: SystemTime::now() })
    }
}

/// Where one process's exit status lands; any number of threads may wait on it.
pub type ExitCell = wisp_protocols::exit::ExitCell<ExitStatus>;

#[derive(Default)]
pub struct Reaper {
    reap_lock: RwLock<()>,
    owners: Mutex<HashMap<i32, Arc<ExitCell>>>,
    /// Set when a child may exist again after `ECHILD` (a spawn happened).
    spawned: Mutex<bool>,
    spawned_cv: Condvar,
}

/// Held while creating processes: nothing is reaped meanwhile.
pub struct SpawnGuard<'a> {
    reaper: &'a Reaper,
    _lock: RwLockWriteGuard<'a, ()>,
}

impl SpawnGuard<'_> {
    /// Registers a new child (or a process that will be reparented to the agent):
    /// its exit status will go to the returned cell.
    pub fn register(&self, pid: Pid) -> Arc<ExitCell> {
        let cell = Arc::new(ExitCell::default());
        self.reaper.owners.lock().unwrap_or_else(|e| e.into_inner()).insert(pid.as_raw(), cell.clone());
        cell
    }
}

impl Drop for SpawnGuard<'_> {
    fn drop(&mut self) {
        *self.reaper.spawned.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.reaper.spawned_cv.notify_all();
    }
}

impl Reaper {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Starts the reaper thread.
    pub fn start(self: &Arc<Self>) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new().name("reaper".into()).spawn(move || me.run())?;
        Ok(())
    }

    pub fn spawn_guard(&self) -> SpawnGuard<'_> {
        SpawnGuard { reaper: self, _lock: self.reap_lock.write().unwrap_or_else(|e| e.into_inner()) }
    }

    fn read_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.reap_lock.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `signal` to a registered process unless it has already been reaped.
    pub fn signal(&self, pid: Pid, cell: &ExitCell, signal: i32) -> Result<(), ReaperError> {
        let sig = Signal::try_from(signal).map_err(|_| ReaperError::BadSignal(signal))?;
        let _g = self.read_guard();
        if cell.is_set() {
            return Err(ReaperError::AlreadyExited(pid.as_raw()));
        }
        match kill(pid, sig) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(ReaperError::Signal { pid: pid.as_raw(), signal, source: e }),
        }
    }

    /// Sends `signal` to pids that the caller just read from a cgroup (they may not
    /// be our children). Holding the read lock keeps our own children from being
    /// reaped, and so their pids from being reused, while the signals go out.
    pub fn signal_many(&self, pids: &[Pid], signal: i32) -> Result<(), ReaperError> {
        let sig = Signal::try_from(signal).map_err(|_| ReaperError::BadSignal(signal))?;
        let _g = self.read_guard();
        for &pid in pids {
            match kill(pid, sig) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => return Err(ReaperError::Signal { pid: pid.as_raw(), signal, source: e }),
            }
        }
        Ok(())
    }

    fn run(&self) {
        loop {
            match waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => {
                    // No children: sleep until a spawn creates one.
                    let mut s = self.spawned.lock().unwrap_or_else(|e| e.into_inner());
                    if !*s {
                        s = self
                            .spawned_cv
                            .wait_timeout(s, Duration::from_secs(1))
                            .map(|(g, _)| g)
                            .unwrap_or_else(|e| e.into_inner().0);
                    }
                    *s = false;
                    continue;
                }
                Err(e) => {
                    log::warn!("reaper: waitid failed: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            self.reap_all();
        }
    }

    fn reap_all(&self) {
        let _g = self.reap_lock.write().unwrap_or_else(|e| e.into_inner());
        loop {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(ws) => self.dispatch(ws),
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
    }

    fn dispatch(&self, ws: WaitStatus) {
        let Some(pid) = ws.pid() else { return };
        let Some(status) = ExitStatus::from_wait(ws) else { return };
        let owner = self.owners.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid.as_raw());
        match owner {
            Some(cell) => {
                log::debug!("process {pid} exited with status {}", status.status);
                cell.set(status);
            }
            None => log::debug!("reaped orphan {pid} (status {})", status.status),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    #[test]
    fn exit_status_is_reported_like_runc() {
        let p = Pid::from_raw(42);
        assert_eq!(ExitStatus::from_wait(WaitStatus::Exited(p, 0)).unwrap().status, 0);
        assert_eq!(ExitStatus::from_wait(WaitStatus::Exited(p, 3)).unwrap().status, 3);
        assert_eq!(ExitStatus::from_wait(WaitStatus::Signaled(p, Signal::SIGKILL, false)).unwrap().status, 137);
        assert_eq!(ExitStatus::from_wait(WaitStatus::Signaled(p, Signal::SIGTERM, true)).unwrap().status, 143);
        assert!(ExitStatus::from_wait(WaitStatus::StillAlive).is_none());
        assert!(ExitStatus::from_wait(WaitStatus::Continued(p)).is_none());
    }

    #[test]
    fn reaped_processes_are_not_signalled() {
        let r = Reaper::default();
        let cell = ExitCell::default();
        cell.set(ExitStatus { status: 0, at: SystemTime::now() });
        assert!(matches!(r.signal(Pid::from_raw(1), &cell, 15), Err(ReaperError::AlreadyExited(1))));
        assert!(matches!(r.signal(Pid::from_raw(1), &ExitCell::default(), 999), Err(ReaperError::BadSignal(999))));
    }
}
