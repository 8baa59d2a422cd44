//! Process stdio: the pipes or pty a process gets, and the stdio stream service on
//! vsock port 1025 that joins them to the host.
//!
//! A process's stdout/stderr pipe is created before the process and its read end is
//! kept unread until the host attaches the stream, so output written before the
//! attach (even by a process that exits at once) stays in the pipe and is delivered;
//! copying starts only after the attach. The stream is closed when the process side
//! reaches EOF, i.e. when every writer (the process and its children) is gone.
//! stdin: host EOF (write half-close) closes the process's stdin. TTY: one stream both
//! ways; the pty master is received from libcontainer's console socket.
//!
//! Trusts: nothing in a stream header (read with a deadline, bounded by the protocols
//! crate); ids are only used for lookups. Each stream gets one thread (two for a TTY).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::socket::Shutdown;
use nix::unistd::pipe2;
use wisp_protocols::stdio::{StreamHeader, StreamKind, ATTACHED, REFUSED};

use crate::listener::{StreamConn, StreamListener};

/// How long a new connection may take to send its header.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(5);
const COPY_BUF: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StdioError {
    #[error("cannot create a stdio pipe: {0}")]
    Pipe(nix::Error),
    #[error("cannot open /dev/null for an unused stdio stream: {0}")]
    DevNull(io::Error),
    #[error("{0} stream is not available for this process (not requested, already attached or closed)")]
    NotAvailable(&'static str),
    #[error("process has no terminal")]
    NoTerminal,
    #[error("terminal resize failed: {0}")]
    Resize(nix::Error),
    #[error("the process's terminal has not been received yet")]
    NoPtyYet,
}

/// What the host asked for (the protocol's `StdioSpec`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StdioRequest {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub terminal: bool,
}

/// The process's ends of its stdio, handed to libcontainer (absent for a TTY).
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

enum StdinEnd {
    Unused,
    Pending(File),
    Attached(StreamConn),
    Closed,
}

/// The agent's ends of one process's stdio.
pub struct ProcessIo {
    terminal: bool,
    stdin: Mutex<StdinEnd>,
    stdout: Mutex<Option<File>>,
    stderr: Mutex<Option<File>>,
    pty_master: Mutex<Option<Arc<File>>>,
    tty_attached: Mutex<bool>,
    /// Clones of attached connections, shut down when the process is discarded.
    attached: Mutex<Vec<StreamConn>>,
}

impl ProcessIo {
    /// Pipes for the requested streams, /dev/null for the others.
    pub fn pipes(req: StdioRequest) -> Result<(Self, ChildStdio), StdioError> {
        let null = |write: bool| -> Result<OwnedFd, StdioError> {
            let f =
                std::fs::OpenOptions::new().read(!write).write(write).open("/dev/null").map_err(StdioError::DevNull)?;
            Ok(f.into())
        };
        let pipe = || pipe2(OFlag::O_CLOEXEC).map_err(StdioError::Pipe);
        let (stdin_end, child_in) = if req.stdin {
            let (r, w) = pipe()?;
            (StdinEnd::Pending(File::from(w)), r)
        } else {
            (StdinEnd::Unused, null(false)?)
        };
        let (out_end, child_out) = if req.stdout {
            let (r, w) = pipe()?;
            (Some(File::from(r)), w)
        } else {
            (None, null(true)?)
        };
        let (err_end, child_err) = if req.stderr {
            let (r, w) = pipe()?;
            (Some(File::from(r)), w)
        } else {
            (None, null(true)?)
        };
        let io = Self {
            terminal: false,
            stdin: Mutex::new(stdin_end),
            stdout: Mutex::new(out_end),
            stderr: Mutex::new(err_end),
            pty_master: Mutex::new(None),
            tty_attached: Mutex::new(false),
            attached: Mutex::new(Vec::new()),
        };
        Ok((io, ChildStdio { stdin: child_in, stdout: child_out, stderr: child_err }))
    }

    /// A TTY process: the master arrives later through `set_pty_master`.
    pub fn terminal() -> Self {
        Self {
            terminal: true,
            stdin: Mutex::new(StdinEnd::Unused),
            stdout: Mutex::new(None),
            stderr: Mutex::new(None),
            pty_master: Mutex::new(None),
            tty_attached: Mutex::new(false),
            attached: Mutex::new(Vec::new()),
        }
    }

    pub fn set_pty_master(&self, master: File) {
        *lock(&self.pty_master) = Some(Arc::new(master));
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), StdioError> {
        if !self.terminal {
            return Err(StdioError::NoTerminal);
        }
        let master = lock(&self.pty_master).clone().ok_or(StdioError::NoPtyYet)?;
        let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(StdioError::Resize(nix::Error::last()));
        }
        Ok(())
    }

    /// Releases pending pipe ends and stops input copies. Output copies are left to
    /// finish on their own (EOF once the process side is gone), so late output is
    /// still delivered.
    pub fn discard(&self) {
        if let StdinEnd::Attached(conn) = std::mem::replace(&mut *lock(&self.stdin), StdinEnd::Closed) {
            conn.shutdown(Shutdown::Read);
        }
        lock(&self.stdout).take();
        lock(&self.stderr).take();
        for c in lock(&self.attached).drain(..) {
            c.shutdown(Shutdown::Read);
        }
    }

    fn remember(&self, conn: &StreamConn) {
        if let Ok(c) = conn.try_clone() {
            lock(&self.attached).push(c);
        }
    }

    /// Attaches one stream and copies until its end. Answers the header first.
    pub fn attach(&self, kind: StreamKind, mut conn: StreamConn) -> Result<(), StdioError> {
        match kind {
            StreamKind::Stdin => {
                let pipe = {
                    let mut s = lock(&self.stdin);
                    match std::mem::replace(&mut *s, StdinEnd::Closed) {
                        StdinEnd::Pending(f) => {
                            *s = match conn.try_clone() {
                                Ok(c) => StdinEnd::Attached(c),
                                Err(_) => StdinEnd::Closed,
                            };
                            f
                        }
                        other => {
                            *s = other;
                            return Err(StdioError::NotAvailable("stdin"));
                        }
                    }
                };
                answer(&mut conn, ATTACHED);
                copy_input(&mut conn, pipe);
                let mut s = lock(&self.stdin);
                if matches!(*s, StdinEnd::Attached(_)) {
                    *s = StdinEnd::Closed;
                }
                Ok(())
            }
            StreamKind::Stdout | StreamKind::Stderr => {
                let (slot, name) =
                    if kind == StreamKind::Stdout { (&self.stdout, "stdout") } else { (&self.stderr, "stderr") };
                let pipe = lock(slot).take().ok_or(StdioError::NotAvailable(name))?;
                self.remember(&conn);
                answer(&mut conn, ATTACHED);
                copy_output(pipe, &mut conn);
                conn.shutdown(Shutdown::Write);
                Ok(())
            }
            StreamKind::Tty => {
                if !self.terminal {
                    return Err(StdioError::NoTerminal);
                }
                let master = lock(&self.pty_master).clone().ok_or(StdioError::NoPtyYet)?;
                {
                    let mut a = lock(&self.tty_attached);
                    if *a {
                        return Err(StdioError::NotAvailable("tty"));
                    }
                    *a = true;
                }
                self.remember(&conn);
                answer(&mut conn, ATTACHED);
                let input_conn = conn.try_clone();
                let input_master = master.try_clone();
                if let (Ok(mut ic), Ok(im)) = (input_conn, input_master) {
                    let _ = std::thread::Builder::new().name("tty-in".into()).spawn(move || copy_input(&mut ic, im));
                }
                let out = master.try_clone().map_err(|_| StdioError::NotAvailable("tty"))?;
                copy_output(out, &mut conn);
                conn.shutdown(Shutdown::Write);
                Ok(())
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn answer(conn: &mut StreamConn, byte: u8) {
    let _ = conn.write_all(&[byte]);
}

/// Host -> process until the host's EOF; dropping `dst` closes the process's stdin.
fn copy_input(src: &mut StreamConn, mut dst: File) {
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if dst.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}

/// Process -> host until the process side's EOF. If the host goes away, keep draining
/// so the process never blocks on a full pipe.
fn copy_output(mut src: File, dst: &mut StreamConn) {
    let mut buf = vec![0u8; COPY_BUF];
    let mut host_gone = false;
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // EIO on a pty master: the terminal's last user is gone.
            Err(_) => break,
        };
        if !host_gone && dst.write_all(&buf[..n]).is_err() {
            host_gone = true;
        }
    }
}

/// Finds the stdio of a process by the ids in a stream header.
pub trait ProcessLookup: Send + Sync {
    fn process_io(&self, container_id: &str, exec_id: &str) -> Option<Arc<ProcessIo>>;
}

/// Accepts stdio streams forever (one thread per stream).
pub fn serve(listener: StreamListener, lookup: Arc<dyn ProcessLookup>) {
    loop {
        let conn = match listener.accept() {
            Ok(c) => c,
            Err(e) => {
                log::warn!("stdio: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let lookup = lookup.clone();
        let spawned =
            std::thread::Builder::new().name("stdio".into()).spawn(move || handle_stream(conn, lookup.as_ref()));
        if let Err(e) = spawned {
            log::warn!("stdio: cannot start a stream thread: {e}");
        }
    }
}

fn handle_stream(mut conn: StreamConn, lookup: &dyn ProcessLookup) {
    let header = match read_header(&mut conn) {
        Ok(h) => h,
        Err(e) => {
            log::warn!("stdio: refused a stream: {e}");
            answer(&mut conn, REFUSED);
            return;
        }
    };
    let Some(io) = lookup.process_io(&header.container_id, &header.exec_id) else {
        log::warn!(
            "stdio: refused {:?} stream: no process {:?} in container {:?}",
            header.stream,
            header.exec_id,
            header.container_id
        );
        answer(&mut conn, REFUSED);
        return;
    };
    let reply_conn = conn.try_clone();
    if let Err(e) = io.attach(header.stream, conn) {
        log::warn!("stdio: refused {:?} stream of {:?}/{:?}: {e}", header.stream, header.container_id, header.exec_id);
        if let Ok(mut c) = reply_conn {
            answer(&mut c, REFUSED);
        }
    }
}

/// Reads the header within `HEADER_DEADLINE`, then clears the timeout for the copy.
pub fn read_header(conn: &mut StreamConn) -> Result<StreamHeader, String> {
    conn.set_read_timeout(Some(HEADER_DEADLINE)).map_err(|e| e.to_string())?;
    let h = StreamHeader::read_from(conn).map_err(|e| e.to_string())?;
    conn.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn pair() -> (StreamConn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (StreamConn::from_fd(a.into()), b)
    }

    struct One(Arc<ProcessIo>);
    impl ProcessLookup for One {
        fn process_io(&self, c: &str, e: &str) -> Option<Arc<ProcessIo>> {
            (c == "c1" && e.is_empty()).then(|| self.0.clone())
        }
    }

    #[test]
    fn output_written_before_attach_is_delivered_then_eof() {
        let (io, child) = ProcessIo::pipes(StdioRequest { stdout: true, ..Default::default() }).unwrap();
        let mut w = File::from(child.stdout);
        w.write_all(b"early").unwrap();
        drop(w); // the process exited
        let io = Arc::new(io);
        let (agent_side, mut host) = pair();
        let t = std::thread::spawn({
            let io = io.clone();
            move || handle_stream(agent_side, &One(io))
        });
        StreamHeader { container_id: "c1".into(), exec_id: String::new(), stream: StreamKind::Stdout }
            .write_to(&mut host)
            .unwrap();
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"\0early");
        t.join().unwrap();
        // A second attach is refused.
        let (agent_side, mut host) = pair();
        let t = std::thread::spawn(move || handle_stream(agent_side, &One(io)));
        StreamHeader { container_id: "c1".into(), exec_id: String::new(), stream: StreamKind::Stdout }
            .write_to(&mut host)
            .unwrap();
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, [REFUSED]);
        t.join().unwrap();
    }

    #[test]
    fn stdin_eof_from_host_closes_the_pipe() {
        let (io, child) = ProcessIo::pipes(StdioRequest { stdin: true, ..Default::default() }).unwrap();
        let io = Arc::new(io);
        let (agent_side, mut host) = pair();
        let t = std::thread::spawn({
            let io = io.clone();
            move || handle_stream(agent_side, &One(io))
        });
        StreamHeader { container_id: "c1".into(), exec_id: String::new(), stream: StreamKind::Stdin }
            .write_to(&mut host)
            .unwrap();
        let mut ack = [9u8];
        host.read_exact(&mut ack).unwrap();
        assert_eq!(ack[0], ATTACHED);
        host.write_all(b"input").unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = String::new();
        File::from(child.stdin).read_to_string(&mut got).unwrap();
        assert_eq!(got, "input");
        t.join().unwrap();
    }

    #[test]
    fn bad_headers_and_unknown_processes_are_refused() {
        let (io, _child) = ProcessIo::pipes(StdioRequest::default()).unwrap();
        let io = Arc::new(io);
        for bytes in [b"XXXX\x01\x01\0\0\0\0".to_vec(), {
            let mut v =
                StreamHeader { container_id: "nope".into(), exec_id: String::new(), stream: StreamKind::Stdout }
                    .encode()
                    .unwrap();
            v.extend_from_slice(b"junk");
            v
        }] {
            let (agent_side, mut host) = pair();
            let io = io.clone();
            let t = std::thread::spawn(move || handle_stream(agent_side, &One(io)));
            host.write_all(&bytes).unwrap();
            let mut got = Vec::new();
            let _ = host.read_to_end(&mut got);
            assert_eq!(got, [REFUSED]);
            t.join().unwrap();
        }
        // Not requested at create time: refused.
        let (agent_side, mut host) = pair();
        let t = std::thread::spawn(move || handle_stream(agent_side, &One(io)));
        StreamHeader { container_id: "c1".into(), exec_id: String::new(), stream: StreamKind::Stderr }
            .write_to(&mut host)
            .unwrap();
        let mut got = Vec::new();
        let _ = host.read_to_end(&mut got);
        assert_eq!(got, [REFUSED]);
        t.join().unwrap();
    }

    #[test]
    fn resizing_needs_a_terminal() {
        let (io, _child) = ProcessIo::pipes(StdioRequest { stdin: true, ..Default::default() }).unwrap();
        assert!(io.resize(10, 10).is_err());
    }
}
