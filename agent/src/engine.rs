//! The only module that calls libcontainer: create a container's init, exec a process
//! into a running container, start, delete.
//!
//! Creation runs in the spawn helper (see `spawn`) with the reaper's spawn guard held;
//! the new process's pid is registered before the guard is released. A TTY's pty
//! master comes back through a console socket the agent listens on. Start and delete
//! run in the agent itself, under one lock because libcontainer's start changes the
//! process-wide working directory for a moment.
//!
//! Trusts: the spec, already checked by `spec`; libcontainer's error chains are passed
//! on as the operator-facing message.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container as LcContainer;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::{default::DefaultExecutor, Executor, ExecutorError, ExecutorValidationError};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxSeccomp, Spec};

use crate::reaper::{ExitCell, Reaper};
use crate::spawn::{self, SpawnError};
use crate::stdio::ChildStdio;

/// Longest a container or exec creation may take before the helper is killed.
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the agent waits for a new TTY's pty master.
const CONSOLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("creating container {id}: {source}")]
    Create { id: String, source: SpawnError },
    #[error("exec {exec_id} in container {id}: {source}")]
    Exec { id: String, exec_id: String, source: SpawnError },
    #[error("console socket for {0}: {1}")]
    Console(String, String),
    #[error("starting container {id}: {msg}")]
    Start { id: String, msg: String },
    #[error("deleting container {id}: {msg}")]
    Delete { id: String, msg: String },
}

/// A process that libcontainer created and the reaper now tracks.
pub struct Spawned {
    pub pid: Pid,
    pub exit: Arc<ExitCell>,
    pub pty_master: Option<File>,
}

/// libcontainer's state root and the agent's scratch dir for console sockets.
pub struct Engine {
    state_root: PathBuf,
    console_dir: PathBuf,
    reaper: Arc<Reaper>,
    start_lock: Mutex<()>,
    next_console: AtomicU64,
}

/// Formats an error with its whole source chain ("a: b: c").
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A TTY's console socket: the agent listens, the container's init connects and sends
/// the pty master.
struct ConsoleSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl ConsoleSocket {
    fn receive_master(&self, owner: &str) -> Result<File, EngineError> {
        let err = |m: String| EngineError::Console(owner.to_string(), m);
        self.listener.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
        let deadline = Instant::now() + CONSOLE_TIMEOUT;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => return Err(err(format!("no connection from the container: {e}"))),
            }
        };
        stream.set_nonblocking(false).map_err(|e| err(e.to_string()))?;
        stream.set_read_timeout(Some(CONSOLE_TIMEOUT)).map_err(|e| err(e.to_string()))?;
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(stream.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
            .map_err(|e| err(format!("receiving the pty master: {e}")))?;
        for c in msg.cmsgs().map_err(|e| err(e.to_string()))? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                let mut files: Vec<File> = fds
                    .into_iter()
                    // SAFETY: SCM_RIGHTS gave us these descriptors.
                    .map(|fd| File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
                    .collect();
                if let Some(master) = files.pop() {
                    return Ok(master);
                }
            }
        }
        Err(err("the container sent no pty master".into()))
    }
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the exec'd process runs under: the container's seccomp profile, which
/// libcontainer's tenant builder does not carry over, then the default executor.
/// Without no_new_privileges, installing a filter needs CAP_SYS_ADMIN; when the exec's
/// capabilities lack it, no_new_privileges is set so the profile still applies
/// (runc installs it before dropping capabilities instead).
#[derive(Clone)]
struct ExecWithSeccomp {
    seccomp: Option<LinuxSeccomp>,
}

impl Executor for ExecWithSeccomp {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        if let Some(profile) = &self.seccomp {
            if libcontainer::seccomp::initialize_seccomp(profile).is_err() {
                // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes plain integers.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                libcontainer::seccomp::initialize_seccomp(profile)
                    .map_err(|e| ExecutorError::Other(format!("installing the container's seccomp profile: {e}")))?;
            }
        }
        DefaultExecutor {}.exec(spec)
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

pub struct InitParams<'a> {
    pub container_id: &'a str,
    pub bundle: &'a Path,
    pub stdio: Option<ChildStdio>,
    pub terminal: bool,
}

pub struct ExecParams<'a> {
    pub container_id: &'a str,
    pub exec_id: &'a str,
    pub process_json: &'a Path,
    pub stdio: Option<ChildStdio>,
    pub terminal: bool,
    pub seccomp: Option<LinuxSeccomp>,
}

impl Engine {
    pub fn new(state_dir: &Path, reaper: Arc<Reaper>) -> std::io::Result<Self> {
        let state_root = state_dir.join("c");
        let console_dir = state_dir.join("t");
        std::fs::create_dir_all(&state_root)?;
        std::fs::create_dir_all(&console_dir)?;
        Ok(Self { state_root, console_dir, reaper, start_lock: Mutex::new(()), next_console: AtomicU64::new(1) })
    }

    /// libcontainer's state directory of a container.
    pub fn container_state_dir(&self, id: &str) -> PathBuf {
        self.state_root.join(id)
    }

    fn console_socket(&self, owner: &str) -> Result<ConsoleSocket, EngineError> {
        let n = self.next_console.fetch_add(1, Ordering::Relaxed);
        let path = self.console_dir.join(format!("{n}.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| EngineError::Console(owner.into(), format!("{}: {e}", path.display())))?;
        Ok(ConsoleSocket { path, listener })
    }

    fn keep_fds(stdio: &Option<ChildStdio>) -> Vec<RawFd> {
        stdio
            .as_ref()
            .map(|s| vec![s.stdin.as_raw_fd(), s.stdout.as_raw_fd(), s.stderr.as_raw_fd()])
            .unwrap_or_default()
    }

    /// Creates the container's init process (waiting for StartContainer).
    pub fn create_init(&self, p: InitParams<'_>) -> Result<Spawned, EngineError> {
        let console = if p.terminal { Some(self.console_socket(p.container_id)?) } else { None };
        let console_path = console.as_ref().map(|c| c.path.clone());
        let keep = Self::keep_fds(&p.stdio);
        let (id, root, bundle, stdio) =
            (p.container_id.to_string(), self.state_root.clone(), p.bundle.to_path_buf(), p.stdio);
        let work = move || -> Result<i32, String> {
            let mut b = ContainerBuilder::new(id, SyscallType::default())
                .validate_id()
                .map_err(|e| chain(&e))?
                .with_root_path(root)
                .map_err(|e| chain(&e))?
                .with_console_socket(console_path);
            if let Some(s) = stdio {
                b = b.with_stdin(s.stdin).with_stdout(s.stdout).with_stderr(s.stderr);
            }
            let c = b.as_init(bundle).with_systemd(false).with_detach(true).build().map_err(|e| chain(&e))?;
            c.pid().map(|p| p.as_raw()).ok_or_else(|| "libcontainer reported no pid".to_string())
        };
        let guard = self.reaper.spawn_guard();
        let pid = spawn::in_helper(&keep, CREATE_TIMEOUT, work)
            .map_err(|source| EngineError::Create { id: p.container_id.into(), source })?;
        let exit = guard.register(pid);
        drop(guard);
        let pty_master = match &console {
            Some(c) => Some(c.receive_master(p.container_id)?),
            None => None,
        };
        Ok(Spawned { pid, exit, pty_master })
    }

    /// Runs a new process in a running container (libcontainer's tenant builder).
    pub fn exec(&self, p: ExecParams<'_>) -> Result<Spawned, EngineError> {
        let owner = format!("{}/{}", p.container_id, p.exec_id);
        let console = if p.terminal { Some(self.console_socket(&owner)?) } else { None };
        let console_path = console.as_ref().map(|c| c.path.clone());
        let keep = Self::keep_fds(&p.stdio);
        let (id, root, process, stdio) =
            (p.container_id.to_string(), self.state_root.clone(), p.process_json.to_path_buf(), p.stdio);
        let executor = ExecWithSeccomp { seccomp: p.seccomp };
        let work = move || -> Result<i32, String> {
            let mut b = ContainerBuilder::new(id, SyscallType::default())
                .with_root_path(root)
                .map_err(|e| chain(&e))?
                .with_console_socket(console_path)
                .with_executor(executor);
            if let Some(s) = stdio {
                b = b.with_stdin(s.stdin).with_stdout(s.stdout).with_stderr(s.stderr);
            }
            let pid = b.as_tenant().with_process(Some(process)).with_detach(true).build().map_err(|e| chain(&e))?;
            Ok(pid.as_raw())
        };
        let guard = self.reaper.spawn_guard();
        let pid = spawn::in_helper(&keep, CREATE_TIMEOUT, work).map_err(|source| EngineError::Exec {
            id: p.container_id.into(),
            exec_id: p.exec_id.into(),
            source,
        })?;
        let exit = guard.register(pid);
        drop(guard);
        let pty_master = match &console {
            Some(c) => Some(c.receive_master(&owner)?),
            None => None,
        };
        Ok(Spawned { pid, exit, pty_master })
    }

    /// Lets a created container's init exec its payload.
    pub fn start(&self, id: &str) -> Result<(), EngineError> {
        let err = |e: &dyn std::error::Error| EngineError::Start { id: id.into(), msg: chain(e) };
        let _g = self.start_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = LcContainer::load(self.container_state_dir(id)).map_err(|e| err(&e))?;
        c.start().map_err(|e| err(&e))
    }

    /// Deletes libcontainer's state (and the cgroup). Processes must be dead or dying.
    pub fn delete(&self, id: &str) -> Result<(), EngineError> {
        let dir = self.container_state_dir(id);
        if !dir.exists() {
            return Ok(());
        }
        let err = |e: &dyn std::error::Error| EngineError::Delete { id: id.into(), msg: chain(e) };
        let _g = self.start_lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut c = LcContainer::load(dir.clone()).map_err(|e| err(&e))?;
        c.delete(true).map_err(|e| err(&e))
    }

    /// Removes libcontainer's state directory without asking libcontainer (last resort
    /// when its state is unreadable).
    pub fn forget(&self, id: &str) {
        let _ = std::fs::remove_dir_all(self.container_state_dir(id));
    }
}
