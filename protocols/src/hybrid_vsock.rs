//! The host side of hybrid vsock: reach a guest vsock port through the VMM's Unix
//! socket by sending `CONNECT <port>\n` and reading `OK <host_port>\n`. Written once
//! and used by the shim, the tests and the benchmarks.
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
    #[error("guest port {port} via {path}: the VMM answered {answer:?} instead of OK (nothing listens on that port yet?)")]
    Refused { path: PathBuf, port: u32, answer: String },
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
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
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
    let answer = String::from_utf8_lossy(&line).into_owned();
    let ok = answer.strip_prefix("OK ").is_some_and(|n| n.trim().parse::<u32>().is_ok());
    if !ok {
        return Err(DialError::Refused { path: path.into(), port, answer });
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

    #[test]
    fn refusal_is_reported() {
        let (_d, path, _h) = fake_vmm("NO\n");
        let err = connect(&path, 1024, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(err, DialError::Refused { .. }), "{err}");
    }

    #[test]
    fn dial_gives_up_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing.sock");
        let t = Instant::now();
        let err = dial(&path, 1024, Duration::from_millis(50), Duration::from_millis(300)).unwrap_err();
        assert!(matches!(err, DialError::Deadline { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(3));
        assert!(err.to_string().contains("missing.sock"));
    }

    #[test]
    fn a_silent_vmm_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        let l = UnixListener::bind(&path).unwrap();
        let _keep = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            std::thread::sleep(Duration::from_secs(2));
            drop(s);
        });
        let err = connect(&path, 1024, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(err, DialError::Handshake { .. }), "{err}");
    }
}
