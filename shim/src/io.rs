//! A process's stdio: containerd's FIFOs on one side, one vsock stream per stdio
//! stream to the agent (port 1025) on the other. Bytes flow through the kernel and a
//! copy thread per stream, never through RPCs.
//!
//! - stdin: FIFO -> stream; containerd closing the FIFO (or CloseIO) half-closes the
//!   stream, which the agent turns into the process's stdin EOF.
//! - stdout/stderr: stream -> FIFO until the agent closes the stream, which it does
//!   once the process's side is closed: `wait_output` then knows everything arrived.
//! - TTY: one stream carries both directions.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wisp_protocols::stdio::{StreamHeader, StreamKind, ATTACHED};
use wisp_protocols::{hybrid_vsock, AGENT_STDIO_PORT};

#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("stdio stream {kind:?} of {container}/{exec}: {reason}")]
    Stream { container: String, exec: String, kind: StreamKind, reason: String },
    #[error("{0}")]
    Logger(String),
}

/// containerd's stdio paths for a process ("" = not connected).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    pub fn spec(&self) -> wisp_protocols::agent::StdioSpec {
        wisp_protocols::agent::StdioSpec {
            stdin: !self.stdin.is_empty(),
            stdout: !self.stdout.is_empty(),
            stderr: !self.stderr.is_empty() && !self.terminal,
            terminal: self.terminal,
            ..Default::default()
        }
    }
}

/// The running copies of one process's stdio.
pub struct ProcessIo {
    stdin_stream: Arc<Mutex<Option<UnixStream>>>,
    stdin_fifo: Option<PathBuf>,
    /// Set by CloseIO: the stdin copier ends once the FIFO is drained.
    stdin_closing: Arc<std::sync::atomic::AtomicBool>,
    outputs: Vec<JoinHandle<()>>,
    input: Option<JoinHandle<()>>,
}

fn open_stream(vsock: &Path, container: &str, exec: &str, kind: StreamKind) -> Result<UnixStream, IoError> {
    let err = |reason: String| IoError::Stream { container: container.into(), exec: exec.into(), kind, reason };
    let mut s = hybrid_vsock::dial(vsock, AGENT_STDIO_PORT, Duration::from_secs(2), Duration::from_secs(10))
        .map_err(|e| err(e.to_string()))?;
    let header = StreamHeader { container_id: container.into(), exec_id: exec.into(), stream: kind };
    header.write_to(&mut s).map_err(|e| err(e.to_string()))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| err(e.to_string()))?;
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).map_err(|e| err(format!("no answer from the agent: {e}")))?;
    if answer[0] != ATTACHED {
        return Err(err("the agent refused the stream (unknown process or stream already attached)".into()));
    }
    s.set_read_timeout(None).map_err(|e| err(e.to_string()))?;
    Ok(s)
}

/// Where output goes: a FIFO (opened read-write so opening never blocks, even if
/// containerd's reader is gone) or a plain file for `file://` URIs.
fn open_output(path: &str) -> std::io::Result<File> {
    if let Some(file) = path.strip_prefix("file://") {
        return OpenOptions::new().create(true).append(true).open(file);
    }
    OpenOptions::new().read(true).write(true).open(path)
}

/// Where a process's output goes: containerd's FIFO or a `file://` path, or a pipe
/// to a `binary://` logging program (`logger.rs`).
enum Output {
    Path(String),
    Pipe(File),
}

fn copy_out(mut from: UnixStream, to: Output, what: String) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let (opened, to) = match to {
            Output::Path(p) => (open_output(&p), p),
            Output::Pipe(f) => (Ok(f), "the logging program".to_string()),
        };
        let mut out = match opened {
            Ok(f) => f,
            Err(e) => {
                log::warn!("{what}: cannot open {to}: {e}; output is dropped");
                let _ = std::io::copy(&mut from, &mut std::io::sink());
                return;
            }
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(e) = out.write_all(&buf[..n]) {
                        log::warn!("{what}: writing to {to}: {e}; dropping the rest");
                        let _ = std::io::copy(&mut from, &mut std::io::sink());
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("{what}: reading from the guest: {e}");
                    break;
                }
            }
        }
    })
}

/// How often the stdin copier looks at its `closing` flag while the FIFO is idle.
const STDIN_IDLE_CHECK: Duration = Duration::from_millis(50);

/// Copies the stdin FIFO into the stream until the FIFO's writers are gone, or until
/// `closing` is set (CloseIO) and the FIFO holds nothing more: what the client wrote
/// before CloseIO still reaches the process. Then the stream is half-closed (EOF).
fn copy_in(
    path: String,
    stream: Arc<Mutex<Option<UnixStream>>>,
    closing: Arc<std::sync::atomic::AtomicBool>,
    what: String,
) -> JoinHandle<()> {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        // Blocks until containerd opens the write side; `close_stdin` unblocks it.
        let mut fifo = match OpenOptions::new().read(true).custom_flags(libc::O_CLOEXEC).open(&path) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("{what}: cannot open {path}: {e}");
                half_close(&stream);
                return;
            }
        };
        let mut writer = match stream.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(UnixStream::try_clone) {
            Some(Ok(w)) => w,
            _ => return,
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let mut pfd = libc::pollfd { fd: fifo.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: poll(2) on one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, STDIN_IDLE_CHECK.as_millis() as libc::c_int) };
            if ready < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            if ready == 0 {
                // Nothing buffered: after CloseIO that is the end of the input.
                if closing.load(Ordering::Acquire) {
                    break;
                }
                continue;
            }
            match fifo.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if writer.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        half_close(&stream);
    })
}

fn half_close(stream: &Arc<Mutex<Option<UnixStream>>>) {
    if let Some(s) = stream.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
}

impl ProcessIo {
    /// Opens the streams a process needs and starts copying. Call right after the
    /// agent created the process, before it starts.
    pub fn attach(
        vsock: &Path,
        container: &str,
        exec: &str,
        paths: &StdioPaths,
        namespace: &str,
    ) -> Result<Self, IoError> {
        let what = |k: &str| format!("{container}/{exec} {k}");
        let mut outputs = Vec::new();
        // A `binary://` stdout (containerd passes the same URI as stderr) starts the
        // logging program before the process, and both streams go to it.
        let (out_to, err_to) = match crate::logger::BinaryUri::parse(&paths.stdout) {
            Some(uri) => {
                let logger = uri
                    .and_then(|u| crate::logger::start(&u, container, namespace))
                    .map_err(|e| IoError::Logger(e.to_string()))?;
                (Output::Pipe(logger.stdout), Output::Pipe(logger.stderr))
            }
            None => (Output::Path(paths.stdout.clone()), Output::Path(paths.stderr.clone())),
        };
        let stdin_stream = Arc::new(Mutex::new(None));
        let mut input = None;
        let mut stdin_fifo = None;
        if paths.terminal {
            let s = open_stream(vsock, container, exec, StreamKind::Tty)?;
            if !paths.stdout.is_empty() {
                let r = s.try_clone().map_err(|e| IoError::Stream {
                    container: container.into(),
                    exec: exec.into(),
                    kind: StreamKind::Tty,
                    reason: e.to_string(),
                })?;
                outputs.push(copy_out(r, out_to, what("tty")));
            }
            *stdin_stream.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        } else {
            if !paths.stdout.is_empty() {
                outputs.push(copy_out(
                    open_stream(vsock, container, exec, StreamKind::Stdout)?,
                    out_to,
                    what("stdout"),
                ));
            }
            if !paths.stderr.is_empty() {
                outputs.push(copy_out(
                    open_stream(vsock, container, exec, StreamKind::Stderr)?,
                    err_to,
                    what("stderr"),
                ));
            }
            if !paths.stdin.is_empty() {
                *stdin_stream.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(open_stream(vsock, container, exec, StreamKind::Stdin)?);
            }
        }
        let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if !paths.stdin.is_empty() {
            input = Some(copy_in(paths.stdin.clone(), stdin_stream.clone(), closing.clone(), what("stdin")));
            stdin_fifo = Some(PathBuf::from(&paths.stdin));
        }
        Ok(Self { stdin_stream, stdin_fifo, stdin_closing: closing, outputs, input })
    }

    /// Stdin EOF for the process (CloseIO): the copier forwards what the FIFO still
    /// holds, then half-closes the stream. Without a copier the stream closes now.
    pub fn close_stdin(&mut self) {
        self.stdin_closing.store(true, std::sync::atomic::Ordering::Release);
        if let Some(f) = self.stdin_fifo.take() {
            // A reader still blocked in open() gets its writer and then EOF.
            let _ = OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(&f);
        }
        match self.input.take() {
            Some(t) if t.is_finished() => {
                let _ = t.join();
            }
            Some(t) => self.input = Some(t),
            None => half_close(&self.stdin_stream),
        }
    }

    /// Waits until all output reached containerd, at most `timeout`.
    pub fn wait_output(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.outputs.iter().any(|t| !t.is_finished()) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        for t in self.outputs.drain(..) {
            let _ = t.join();
        }
        true
    }
}

impl Drop for ProcessIo {
    fn drop(&mut self) {
        self.close_stdin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdio_spec_follows_the_paths() {
        let p = StdioPaths { stdin: "".into(), stdout: "/o".into(), stderr: "/e".into(), terminal: false };
        let s = p.spec();
        assert!(!s.stdin && s.stdout && s.stderr && !s.terminal);
        let t = StdioPaths { stdin: "/i".into(), stdout: "/o".into(), stderr: "".into(), terminal: true };
        let s = t.spec();
        assert!(s.stdin && s.stdout && !s.stderr && s.terminal);
    }

    #[test]
    fn output_copy_ends_at_stream_eof() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let (mut a, b) = UnixStream::pair().unwrap();
        let t = copy_out(b, Output::Path(format!("file://{}", out.display())), "t".into());
        a.write_all(b"hello\n").unwrap();
        drop(a);
        t.join().unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"hello\n");
    }

    #[test]
    fn stdin_fifo_eof_half_closes_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("in");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let stream = Arc::new(Mutex::new(Some(a)));
        let t = copy_in(fifo.display().to_string(), stream, Arc::default(), "t".into());
        let mut w = OpenOptions::new().write(true).open(&fifo).unwrap();
        w.write_all(b"input").unwrap();
        drop(w);
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"input");
        t.join().unwrap();
    }

    #[test]
    fn close_io_forwards_what_was_written_before_it() {
        // The client wrote and keeps its FIFO end open, then sends CloseIO: the
        // process must still get the bytes, then EOF (crictl exec -i did lose them).
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("in");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let (a, mut b) = UnixStream::pair().unwrap();
        let stream = Arc::new(Mutex::new(Some(a)));
        let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = copy_in(fifo.display().to_string(), stream, closing.clone(), "t".into());
        let mut w = OpenOptions::new().write(true).open(&fifo).unwrap();
        w.write_all(b"interactive\n").unwrap();
        closing.store(true, std::sync::atomic::Ordering::Release);
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"interactive\n");
        t.join().unwrap();
        drop(w);
    }
}
