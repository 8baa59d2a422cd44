//! The host side of hybrid vsock: reach a guest vsock port through the VMM's Unix
//! socket by sending `CONNECT <port>\n` and reading `OK <host_port>\n`. Written once
//! and used by the shim, the tests and the benchmarks.
//!
//! How an attempt ends, as the caller sees it: `OK` is a connection; the VMM closing
//! the stream without a word is a refusal (`Refused`: nothing listens on that guest
//! port, the guest reset the request, or it did not answer within the VMM's own connect
//! timeout), which is how Firecracker-style hybrid vsock refuses; any other line is
//! `Unexpected`; and no answer within the caller's timeout is `Handshake` (a timeout,
//! not a refusal).
//!
//! The VMM end is trusted to speak the protocol, but a VM that is still booting, or
//! dead, must never make a caller hang: every attempt has a timeout and `dial` an
//! overall deadline.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("connecting to {path}: {source}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("guest port {port} via {path}: {source}")]
    Handshake { path: PathBuf, port: u32, source: io::Error },
    #[error("guest port {port} via {path}: refused, the VMM closed without answering (nothing listens there yet?)")]
    Refused { path: PathBuf, port: u32 },
    #[error("guest port {port} via {path}: the VMM answered {answer:?} instead of OK")]
    Unexpected { path: PathBuf, port: u32, answer: String },
    #[error("guest port {port} via {path}: not reachable within {waited:?}; last error: {last}")]
    Deadline { path: PathBuf, port: u32, waited: Duration, last: Box<DialError> },
}

/// One attempt: connect, send the CONNECT line, wait at most `timeout` for `OK`.
pub fn connect(path: &Path, port: u32, timeout: Duration) -> Result<UnixStream, DialError> {
    let mut s = UnixStream::connect(path).map_err(|source| DialError::Connect { path: path.into(), source })?;
    let hs = |source| DialError::Handshake { path: path.into(), port, source };
    s.set_read_timeout(Some(timeout)).map_err(hs)?;
    s.set_write_timeout(Some(timeout)).map_err(hs)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(hs)?;
    // Read byte by byte up to the newline: anything after it is the guest's data.
    let mut line = Vec::with_capacity(16);
    let mut b = [0u8; 1];
    let mut newline = false;
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => {
                newline = true;
                break;
            }
            Ok(_) => {
                line.push(b[0]);
                if line.len() > 64 {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(hs(e)),
        }
    }
    if line.is_empty() && !newline {
        return Err(DialError::Refused { path: path.into(), port });
    }
    let answer = String::from_utf8_lossy(&line).into_owned();
    let ok = newline && answer.strip_prefix("OK ").is_some_and(|n| n.trim().parse::<u32>().is_ok());
    if !ok {
        return Err(DialError::Unexpected { path: path.into(), port, answer });
    }
    s.set_read_timeout(None).map_err(hs)?;
    s.set_write_timeout(None).map_err(hs)?;
    Ok(s)
}

/// Retries `connect` until it succeeds or `deadline` has passed since the call.
/// Use this while a VM boots: the socket may not exist yet, or the guest may not
/// listen yet.
pub fn dial(path: &Path, port: u32, attempt_timeout: Duration, deadline: Duration) -> Result<UnixStream, DialError> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(5);
    loop {
        let remaining = deadline.saturating_sub(start.elapsed());
        match connect(path, port, attempt_timeout.min(remaining.max(Duration::from_millis(1)))) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() + pause >= deadline => {
                return Err(DialError::Deadline { path: path.into(), port, waited: start.elapsed(), last: Box::new(e) })
            }
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    fn fake_vmm(answer: &'static str) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let l = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
            s.write_all(answer.as_bytes()).unwrap();
            s.write_all(b"payload").unwrap();
            line
        });
        (dir, path, h)
    }

    #[test]
    fn handshake_then_data() {
        let (_d, path, h) = fake_vmm("OK 1073741824\n");
        let mut s = connect(&path, 1024, Duration::from_secs(5)).unwrap();
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"payload");
        assert_eq!(h.join().unwrap(), "CONNECT 1024\n");
    }

    /// The VMM refuses the way Firecracker's hybrid vsock does: it reads the CONNECT
    /// line and closes the stream without answering.
    #[test]
    fn refusal_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let l = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut line = String::new();
            std::io::BufReader::new(s).read_line(&mut line).unwrap();
            line
        });
        let err = connect(&path, 1024, Duration::from_secs(30)).unwrap_err();
        assert!(matches!(err, DialError::Refused { port: 1024, .. }), "{err}");
        assert_eq!(h.join().unwrap(), "CONNECT 1024\n");
    }

    #[test]
    fn an_answer_other_than_ok_is_not_a_refusal() {
        for answer in ["NO\n", "OK\n", "OK x\n", "\n"] {
            let (_d, path, _h) = fake_vmm(answer);
            let err = connect(&path, 1024, Duration::from_secs(30)).unwrap_err();
            assert!(
                matches!(&err, DialError::Unexpected { answer: a, .. } if a == answer.trim_end()),
                "{answer:?}: {err}"
            );
        }
    }

    #[test]
    fn dial_gives_up_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.sock");
        // dial runs on a thread so that a dial that never gives up fails the test
        // instead of hanging it. The bound is a hang guard, not a speed claim: it is
        // far beyond the 300 ms deadline.
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let r = dial(&p, 1024, Duration::from_millis(50), Duration::from_millis(300));
            let _ = tx.send((r, t.elapsed()));
        });
        let (r, took) = rx.recv_timeout(Duration::from_secs(60)).expect("dial did not give up: it hangs");
        eprintln!("dial gave up after {took:?} (deadline 300ms)");
        let err = r.unwrap_err();
        match &err {
            DialError::Deadline { last, .. } => assert!(matches!(**last, DialError::Connect { .. }), "{err}"),
            other => panic!("want Deadline, got {other}"),
        }
        assert!(err.to_string().contains("missing.sock"));
    }

    #[test]
    fn a_silent_vmm_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        let l = UnixListener::bind(&path).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let _keep = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            // Holds the stream open, silent, until the test is over.
            let _ = done_rx.recv();
            drop(s);
        });
        // A timeout is a Handshake error, never a refusal.
        let err = connect(&path, 1024, Duration::from_millis(100)).unwrap_err();
        drop(done_tx);
        let timed_out = |e: &io::Error| matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut);
        assert!(matches!(&err, DialError::Handshake { source, .. } if timed_out(source)), "{err}");
    }
}
