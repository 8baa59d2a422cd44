//! Starting wisp-vmm as PID 1 of a PID namespace of its own.
//!
//! `std::process::Command` cannot start a child in a new PID namespace (the flag must be
//! given to clone(2); unshare(2) only moves later children), so this does what it does
//! by hand: everything the child needs (argv, environment, descriptors) is prepared
//! first, then clone(CLONE_NEWPID) and, in the child, only raw system calls until
//! execve: parent-death signal, the cgroup move, no_new_privs, default signal state,
//! stdio, the inherited descriptors. An exec failure comes back through a close-on-exec
//! pipe as an errno, as with `Command`.
//!
//! The parent-death signal is tied to the *thread* that cloned: call `spawn` from a
//! thread that lives as long as the child (the VMM's watcher does).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub struct SpawnSpec {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// Descriptors the child keeps under their own numbers (close-on-exec cleared).
    pub keep_fds: Vec<RawFd>,
    /// `cgroup.procs` of the cgroup the child is moved into before it execs.
    pub cgroup_procs: Option<File>,
    /// Make the child PID 1 of a new PID namespace.
    pub new_pid_ns: bool,
}

pub struct Spawned {
    pub pid: libc::pid_t,
    /// The child's stderr.
    pub stderr: File,
}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "argument contains a NUL byte"))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just returned by the kernel.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl SpawnSpec {
    pub fn new(program: &Path, args: &[std::ffi::OsString]) -> io::Result<Self> {
        let program = cstring(program.as_os_str().as_bytes())?;
        let mut argv = vec![program.clone()];
        for a in args {
            argv.push(cstring(a.as_bytes())?);
        }
        let envp = std::env::vars_os()
            .map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                cstring(&kv)
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self { program, argv, envp, keep_fds: Vec::new(), cgroup_procs: None, new_pid_ns: false })
    }

    /// Starts the child (see the module docs).
    pub fn spawn(&self) -> io::Result<Spawned> {
        let mut argv: Vec<*const libc::c_char> = self.argv.iter().map(|a| a.as_ptr()).collect();
        argv.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = self.envp.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        let devnull = File::options().read(true).write(true).open("/dev/null")?;
        let (err_r, err_w) = pipe()?;
        let (stderr_r, stderr_w) = pipe()?;
        let cgroup = self.cgroup_procs.as_ref().map_or(-1, |f| f.as_raw_fd());
        let flags = libc::SIGCHLD as libc::c_ulong | if self.new_pid_ns { libc::CLONE_NEWPID as libc::c_ulong } else { 0 };
        // SAFETY: clone(2) without CLONE_VM and a null stack behaves like fork: the child
        // gets a copy of this thread only. Until execve or _exit it makes raw system
        // calls on memory prepared above and nothing else (no allocation, no locks).
        let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see above; every call below is a system call wrapper.
            unsafe {
                let fail = |step: i32| -> ! {
                    let e = [*libc::__errno_location(), step];
                    libc::write(err_w.as_raw_fd(), e.as_ptr() as *const libc::c_void, 8);
                    libc::_exit(127)
                };
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) < 0 {
                    fail(1);
                }
                if cgroup >= 0 && libc::write(cgroup, b"0".as_ptr() as *const libc::c_void, 1) < 0 {
                    fail(2);
                }
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                    fail(3);
                }
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                if libc::dup2(devnull.as_raw_fd(), 0) < 0
                    || libc::dup2(devnull.as_raw_fd(), 1) < 0
                    || libc::dup2(stderr_w.as_raw_fd(), 2) < 0
                {
                    fail(4);
                }
                for &fd in &self.keep_fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        fail(5);
                    }
                }
                libc::execve(self.program.as_ptr(), argv.as_ptr(), envp.as_ptr());
                fail(6)
            }
        }
        let pid = pid as libc::pid_t;
        drop(err_w);
        drop(stderr_w);
        let mut report = [0u8; 8];
        let mut got = 0;
        let mut err_r = File::from(err_r);
        while got < report.len() {
            match err_r.read(&mut report[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if got == 0 {
            return Ok(Spawned { pid, stderr: File::from(stderr_r) });
        }
        let mut status = 0;
        // SAFETY: reaping our own child, which failed before exec.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let errno = i32::from_ne_bytes([report[0], report[1], report[2], report[3]]);
        let step = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
        let what = match step {
            1 => "setting the parent-death signal",
            2 => "moving into the pod's cgroup",
            3 => "setting no_new_privs",
            4 => "setting up stdio",
            5 => "passing descriptors",
            _ => "exec",
        };
        let e = io::Error::from_raw_os_error(errno);
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

/// Waits for `pid` (our child) to end; its status as `ExitStatus` would print it.
pub fn wait(pid: libc::pid_t) -> io::Result<std::process::ExitStatus> {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child.
        if unsafe { libc::waitpid(pid, &mut status, 0) } >= 0 {
            return Ok(std::process::ExitStatus::from_raw(status));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn sh(script: &str) -> SpawnSpec {
        SpawnSpec::new(Path::new("/bin/sh"), &[OsString::from("-c"), OsString::from(script)]).unwrap()
    }

    #[test]
    fn runs_with_stderr_piped_and_reports_exit_status() {
        let s = sh("echo to-stderr >&2; echo to-stdout; exit 3");
        let mut child = s.spawn().unwrap();
        let mut err = String::new();
        child.stderr.read_to_string(&mut err).unwrap();
        assert_eq!(err, "to-stderr\n");
        assert_eq!(wait(child.pid).unwrap().code(), Some(3));
    }

    #[test]
    fn a_missing_program_is_an_error_naming_exec() {
        let s = SpawnSpec::new(Path::new("/nonexistent/wisp-vmm"), &[]).unwrap();
        let e = s.spawn().err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("exec"), "{e}");
    }

    #[test]
    fn no_new_privs_and_parent_death_signal_are_set() {
        let mut child = sh("grep NoNewPrivs /proc/self/status >&2").spawn().unwrap();
        let mut err = String::new();
        child.stderr.read_to_string(&mut err).unwrap();
        assert!(err.trim().ends_with('1'), "{err}");
        wait(child.pid).unwrap();
    }

    /// Needs root (a PID namespace).
    #[test]
    #[ignore = "needs root (CLONE_NEWPID)"]
    fn the_child_is_pid_1_of_its_own_namespace() {
        let mut s = sh("echo $$ >&2");
        s.new_pid_ns = true;
        let mut child = s.spawn().unwrap();
        let mut err = String::new();
        child.stderr.read_to_string(&mut err).unwrap();
        assert_eq!(err.trim(), "1");
        assert!(wait(child.pid).unwrap().success());
    }
}
