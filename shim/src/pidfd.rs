//! Signalling the VMM through a pidfd (pidfd_open(2), pidfd_send_signal(2); Linux 5.3),
//! so that a pid the kernel has reused for another process is never signalled.
//!
//! The shim's own VMM is its child: the pidfd is opened right after the spawn, before
//! the watcher thread can reap it, so it refers to that process for as long as the shim
//! holds it. After a dead shim, `delete` only has the pid and the start time recorded
//! in the state directory (`VmmRecord`): a pid alone cannot be made race-free, so the
//! pidfd is opened first and the process's identity (start time and name, from
//! `/proc`) checked after; the signal then goes through the pidfd, which cannot reach
//! a process that took the pid over later. If the pid was reused before the pidfd was
//! opened, the start time differs and nothing is signalled.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A pidfd: a descriptor for one process, valid until it is reaped and never for another.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// pidfd_open(2) for `pid` (in this process's PID namespace).
    pub fn open(pid: libc::pid_t) -> io::Result<Self> {
        // SAFETY: pidfd_open with integer arguments; the result is a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor and nothing else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// pidfd_send_signal(2): `signal` to the process, or ESRCH once it has ended.
    pub fn send_signal(&self, signal: libc::c_int) -> io::Result<()> {
        // SAFETY: pidfd_send_signal on our descriptor with no siginfo and no flags.
        let r = unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.0.as_raw_fd(), signal, std::ptr::null::<u8>(), 0)
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// When process `pid` started, in clock ticks after boot (`/proc/PID/stat`, field 22):
/// with the pid, an identity no later process has.
pub fn start_time(pid: libc::pid_t) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/stat: no start time")))
}

/// Field 22 of a `/proc/PID/stat` line. The name (field 2) is in parentheses and may
/// hold spaces and parentheses itself, so fields are counted after the last `)`.
fn parse_start_time(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 (state) is the first after the name: field 22 is the 20th.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The VMM as the state directory records it (`vmm.pid`: `PID STARTTIME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmmRecord {
    pub pid: libc::pid_t,
    pub start_time: u64,
}

impl VmmRecord {
    pub fn to_file_text(self) -> String {
        format!("{} {}\n", self.pid, self.start_time)
    }

    /// Reads what `to_file_text` wrote; `None` for anything else (a pid without a start
    /// time cannot be checked, so it is not good enough to signal).
    pub fn parse(text: &str) -> Option<Self> {
        let mut fields = text.split_whitespace();
        let pid = fields.next()?.parse::<libc::pid_t>().ok().filter(|&p| p > 0)?;
        let start_time = fields.next()?.parse().ok()?;
        fields.next().is_none().then_some(Self { pid, start_time })
    }
}

/// What `kill_recorded` did.
#[derive(Debug, PartialEq, Eq)]
pub enum KillOutcome {
    Killed,
    /// No process has the pid (any more).
    Gone,
    /// A process has the pid but is not the one recorded: left alone.
    NotTheRecorded(String),
}

/// SIGKILL to the process `record` names, if it still runs under the name `comm`:
/// pidfd first, identity checked after, signal through the pidfd.
pub fn kill_recorded(record: VmmRecord, comm: &str) -> io::Result<KillOutcome> {
    let pidfd = match PidFd::open(record.pid) {
        Ok(p) => p,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(KillOutcome::Gone),
        Err(e) => return Err(e),
    };
    let started = match start_time(record.pid) {
        Ok(t) => t,
        // Ended (and maybe reaped) since the pidfd was opened.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(KillOutcome::Gone),
        Err(e) => return Err(e),
    };
    if started != record.start_time {
        return Ok(KillOutcome::NotTheRecorded(format!(
            "pid {} started at tick {started}, the recorded one at {}",
            record.pid, record.start_time
        )));
    }
    let name = std::fs::read_to_string(format!("/proc/{}/comm", record.pid)).unwrap_or_default();
    if name.trim_end_matches('\n') != comm {
        return Ok(KillOutcome::NotTheRecorded(format!("pid {} is {:?}, not {comm}", record.pid, name.trim_end())));
    }
    match pidfd.send_signal(libc::SIGKILL) {
        Ok(()) => Ok(KillOutcome::Killed),
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(KillOutcome::Gone),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};
    use std::time::{Duration, Instant};

    #[test]
    fn start_time_is_field_22_even_with_parentheses_in_the_name() {
        let line = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 \
                    18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(parse_start_time(line), Some(987654));
        assert_eq!(parse_start_time("1234 (x) S 1 2"), None);
        assert_eq!(parse_start_time("no name at all"), None);
        let me = std::process::id() as libc::pid_t;
        assert!(start_time(me).unwrap() > 0);
    }

    #[test]
    fn records_round_trip_and_a_bare_pid_is_not_a_record() {
        let r = VmmRecord { pid: 77, start_time: 123456 };
        assert_eq!(VmmRecord::parse(&r.to_file_text()), Some(r));
        assert_eq!(VmmRecord::parse("77\n"), None);
        assert_eq!(VmmRecord::parse("0 5"), None);
        assert_eq!(VmmRecord::parse("-1 5"), None);
        assert_eq!(VmmRecord::parse("77 5 6"), None);
        assert_eq!(VmmRecord::parse("77 x"), None);
    }

    fn sleeper() -> Child {
        Command::new("sleep").arg("30").spawn().unwrap()
    }

    /// True once `child` has ended (reaping it), false if it still runs after a moment.
    fn ended(child: &mut Child) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn a_process_whose_start_time_differs_is_not_killed() {
        let mut child = sleeper();
        let pid = child.id() as libc::pid_t;
        let real = start_time(pid).unwrap();
        let wrong = VmmRecord { pid, start_time: real + 1 };
        assert!(
            matches!(kill_recorded(wrong, "sleep").unwrap(), KillOutcome::NotTheRecorded(why) if why.contains("started at"))
        );
        let right = VmmRecord { pid, start_time: real };
        assert!(
            matches!(kill_recorded(right, "wisp-vmm").unwrap(), KillOutcome::NotTheRecorded(why) if why.contains("\"sleep\""))
        );
        assert!(!ended(&mut child), "a process that is not the recorded one was signalled");
        assert_eq!(kill_recorded(right, "sleep").unwrap(), KillOutcome::Killed);
        assert!(ended(&mut child), "the recorded process was not killed");
        // Reaped: the pid names nobody now (unless reused, which the start time catches).
        assert!(matches!(kill_recorded(right, "sleep").unwrap(), KillOutcome::Gone | KillOutcome::NotTheRecorded(_)));
    }

    #[test]
    fn a_pidfd_signals_its_process_and_nothing_after_it_is_reaped() {
        let mut child = sleeper();
        let pidfd = PidFd::open(child.id() as libc::pid_t).unwrap();
        pidfd.send_signal(0).unwrap();
        pidfd.send_signal(libc::SIGKILL).unwrap();
        assert!(ended(&mut child));
        assert_eq!(pidfd.send_signal(libc::SIGKILL).unwrap_err().raw_os_error(), Some(libc::ESRCH));
    }
}
