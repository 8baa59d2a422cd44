//! Runs libcontainer's process creation in a forked, single-threaded helper.
//!
//! Why a helper instead of calling libcontainer from an RPC thread:
//! - libcontainer clones its intermediate and init processes with a raw `clone3`, which
//!   skips libc's fork handlers; in a multi-threaded agent a lock (malloc's, a logger's)
//!   held by another thread at that instant would deadlock the child. `fork()` runs
//!   those handlers, and the helper has one thread when libcontainer clones from it.
//! - the clone inherits every open descriptor until it execs the container payload
//!   (for an init container: until StartContainer). The helper closes all descriptors
//!   except the new process's stdio first, so a waiting container never holds another
//!   process's pipes open.
//! - libcontainer changes process-wide state while creating (oom_score_adj from the
//!   spec, non-dumpable, the working directory): the helper absorbs it.
//! - Rust ignores SIGPIPE at startup, which would leak into containers: the helper
//!   restores default signal handling first.
//!
//! The new process is a child of the helper; when the helper exits it is reparented to
//! the agent (PID 1, or a child subreaper on a host). The caller holds the reaper's
//! `SpawnGuard` throughout, so the reaper cannot take the helper's or the new process's
//! exit status before the new pid is registered.
//!
//! Trusts: the helper's one message on the result pipe (length-prefixed, bounded).

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, signal, sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, pipe2, ForkResult, Pid};

const MAX_MESSAGE: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot create the spawn helper's pipe: {0}")]
    Pipe(Errno),
    #[error("cannot fork the spawn helper: {0}")]
    Fork(Errno),
    #[error("{0}")]
    Failed(String),
    #[error("the spawn helper ended without an answer ({0})")]
    NoAnswer(String),
    #[error("the spawn helper did not answer within {0:?}; it was killed")]
    Timeout(Duration),
}

/// Runs `work` in a forked helper and returns the pid it reports. `keep` lists the
/// descriptors `work` needs; every other descriptor above 2 is closed in the helper.
pub fn in_helper<F>(keep: &[RawFd], timeout: Duration, work: F) -> Result<Pid, SpawnError>
where
    F: FnOnce() -> Result<i32, String>,
{
    let (rd, wr) = pipe2(OFlag::O_CLOEXEC).map_err(SpawnError::Pipe)?;
    // SAFETY: the child only runs `work` (libcontainer, which is written for a freshly
    // cloned process) and then `_exit`s; it touches no lock of the parent's threads
    // (the logger writes without locks; libc's fork handlers reset malloc).
    match unsafe { fork() }.map_err(SpawnError::Fork)? {
        ForkResult::Child => {
            drop(rd);
            let code = helper_main(keep, wr, work);
            // SAFETY: ends the helper without running the parent's atexit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(wr);
            let answer = read_answer(&rd, child, timeout);
            // The helper ends right after answering; reap it ourselves (the caller
            // holds the spawn guard, so the reaper does not).
            if !matches!(answer, Err(SpawnError::Timeout(_))) {
                let _ = waitpid(child, None);
            }
            answer
        }
    }
}

fn helper_main<F>(keep: &[RawFd], wr: OwnedFd, work: F) -> i32
where
    F: FnOnce() -> Result<i32, String>,
{
    let mut keep: Vec<RawFd> = keep.to_vec();
    keep.push(wr.as_raw_fd());
    close_fds_except(&mut keep);
    // SAFETY: resetting dispositions in a single-threaded process.
    unsafe {
        let _ = signal(Signal::SIGPIPE, SigHandler::SigDfl);
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
        .unwrap_or_else(|_| Err("creating the process panicked in the spawn helper".into()));
    let msg = match result {
        Ok(pid) => format!("OK {pid}"),
        Err(e) => format!("ERR {e}"),
    };
    let mut bytes = msg.into_bytes();
    bytes.truncate(MAX_MESSAGE);
    let mut frame = (bytes.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&bytes);
    let mut off = 0;
    while off < frame.len() {
        match nix::unistd::write(&wr, &frame[off..]) {
            Ok(n) => off += n,
            Err(Errno::EINTR) => continue,
            Err(_) => return 1,
        }
    }
    0
}

/// Reads the helper's one framed answer. The pipe may never reach EOF (the new
/// process holds a copy of the write end until it execs), so this polls for data and
/// for the helper's death instead.
fn read_answer(rd: &OwnedFd, helper: Pid, timeout: Duration) -> Result<Pid, SpawnError> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut file = std::fs::File::from(rd.try_clone().map_err(|e| SpawnError::NoAnswer(e.to_string()))?);
    loop {
        if let Some(msg) = frame(&buf) {
            return parse_answer(msg);
        }
        let mut fds = [PollFd::new(rd_borrow(rd), PollFlags::POLLIN)];
        let ready = match poll(&mut fds, PollTimeout::from(200u16)) {
            Ok(n) => n,
            Err(Errno::EINTR) => 0,
            Err(e) => return Err(SpawnError::NoAnswer(format!("poll: {e}"))),
        };
        if ready > 0 {
            let mut chunk = [0u8; 4096];
            match file.read(&mut chunk) {
                Ok(0) => {
                    return Err(SpawnError::NoAnswer("pipe closed".into()));
                }
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > MAX_MESSAGE + 4 {
                        return Err(SpawnError::NoAnswer("answer too long".into()));
                    }
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SpawnError::NoAnswer(e.to_string())),
            }
        }
        match waitpid(helper, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(ws) => {
                // Drain what it wrote before dying.
                let mut chunk = [0u8; 4096];
                let mut fds = [PollFd::new(rd_borrow(rd), PollFlags::POLLIN)];
                while poll(&mut fds, PollTimeout::ZERO).unwrap_or(0) > 0 {
                    match file.read(&mut chunk) {
                        Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                        _ => break,
                    }
                }
                return match frame(&buf) {
                    Some(msg) => parse_answer(msg),
                    None => Err(SpawnError::NoAnswer(format!("{ws:?}"))),
                };
            }
            Err(e) => return Err(SpawnError::NoAnswer(format!("waitpid: {e}"))),
        }
        if Instant::now() > deadline {
            let _ = kill(helper, Signal::SIGKILL);
            let _ = waitpid(helper, None);
            return Err(SpawnError::Timeout(timeout));
        }
    }
}

fn rd_borrow(fd: &OwnedFd) -> std::os::fd::BorrowedFd<'_> {
    use std::os::fd::AsFd;
    fd.as_fd()
}

fn frame(buf: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(buf.get(..4)?.try_into().ok()?) as usize;
    buf.get(4..4 + len)
}

fn parse_answer(msg: &[u8]) -> Result<Pid, SpawnError> {
    let text = String::from_utf8_lossy(msg);
    if let Some(pid) = text.strip_prefix("OK ") {
        return pid
            .trim()
            .parse::<i32>()
            .ok()
            .filter(|p| *p > 0)
            .map(Pid::from_raw)
            .ok_or_else(|| SpawnError::NoAnswer(format!("bad pid in answer {text:?}")));
    }
    if let Some(err) = text.strip_prefix("ERR ") {
        return Err(SpawnError::Failed(err.to_string()));
    }
    Err(SpawnError::NoAnswer(format!("unexpected answer {text:?}")))
}

/// Closes every descriptor above 2 that is not in `keep`.
fn close_fds_except(keep: &mut Vec<RawFd>) {
    keep.retain(|&fd| fd > 2);
    keep.sort_unstable();
    keep.dedup();
    let mut next: u32 = 3;
    let mut ranges = Vec::new();
    for &fd in keep.iter() {
        let fd = fd as u32;
        if fd > next {
            ranges.push((next, fd - 1));
        }
        next = fd + 1;
    }
    ranges.push((next, u32::MAX));
    for (lo, hi) in ranges {
        // SAFETY: close_range only closes descriptors.
        let rc = unsafe { libc::syscall(libc::SYS_close_range, lo, hi, 0u32) };
        if rc != 0 {
            let top = hi.min(65_536);
            for fd in lo..=top {
                // SAFETY: closing a descriptor we own or that is not open.
                unsafe { libc::close(fd as RawFd) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_framed_and_parsed() {
        assert!(frame(&[0, 0, 0]).is_none());
        assert!(frame(&[0, 0, 0, 5, b'O', b'K']).is_none());
        assert_eq!(frame(&[0, 0, 0, 2, b'O', b'K', b'x']).unwrap(), b"OK");
        assert_eq!(parse_answer(b"OK 123").unwrap(), Pid::from_raw(123));
        assert!(matches!(parse_answer(b"OK -4"), Err(SpawnError::NoAnswer(_))));
        assert!(matches!(parse_answer(b"ERR no such file"), Err(SpawnError::Failed(m)) if m == "no such file"));
        assert!(matches!(parse_answer(b"?"), Err(SpawnError::NoAnswer(_))));
    }
}
