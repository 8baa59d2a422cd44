//! containerd's `binary://` stdio URIs: a process's stdout and stderr go to a logging
//! program the client names (nerdctl's `run -d`, Docker-style log drivers), started the
//! way containerd's own shims start it: the URI's path is the program, its query the
//! arguments (each key, then its value when not empty), `CONTAINER_ID` and
//! `CONTAINER_NAMESPACE` in its environment, fd 3 the read end of the stdout pipe, fd 4 of
//! the stderr pipe, fd 5 a pipe it closes once it is ready: the shim waits for that (at
//! most `READY_TIMEOUT`) before the process starts, so no output is lost. The program
//! ends when the output does; a thread reaps it.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long the logging program may take to say it is ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("stdio URI {uri:?}: {reason}")]
    Uri { uri: String, reason: String },
    #[error("logging program {program}: {reason}")]
    Start { program: String, reason: String },
}

/// A `binary://` URI: the program and its arguments.
#[derive(Debug, PartialEq)]
pub struct BinaryUri {
    pub program: String,
    pub args: Vec<String>,
}

impl BinaryUri {
    /// Parses `binary:///path/to/program?key=value&flag`; None for other schemes.
    pub fn parse(uri: &str) -> Option<Result<Self, LoggerError>> {
        let rest = uri.strip_prefix("binary://")?;
        let bad = |reason: &str| LoggerError::Uri { uri: uri.into(), reason: reason.into() };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let program = match percent_decode(path) {
            Some(p) if p.starts_with('/') => p,
            Some(_) => return Some(Err(bad("the program's path is not absolute"))),
            None => return Some(Err(bad("bad percent-encoding in the path"))),
        };
        let mut args = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (Some(k), Some(v)) = (percent_decode(k), percent_decode(v)) else {
                return Some(Err(bad("bad percent-encoding in the query")));
            };
            args.push(k);
            if !v.is_empty() {
                args.push(v);
            }
        }
        Some(Ok(Self { program, args }))
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The write ends of a started logging program's stdout and stderr pipes.
pub struct BinaryLogger {
    pub stdout: File,
    pub stderr: File,
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds on success; they are owned right after.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are not owned elsewhere.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Starts the logging program of `uri` for container `id` in `namespace` and waits
/// until it is ready.
pub fn start(uri: &BinaryUri, id: &str, namespace: &str) -> Result<BinaryLogger, LoggerError> {
    let err = |reason: String| LoggerError::Start { program: uri.program.clone(), reason };
    let (out_r, out_w) = pipe().map_err(|e| err(format!("pipe: {e}")))?;
    let (err_r, err_w) = pipe().map_err(|e| err(format!("pipe: {e}")))?;
    let (ready_r, ready_w) = pipe().map_err(|e| err(format!("pipe: {e}")))?;
    let fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = Command::new(&uri.program);
    cmd.args(&uri.args)
        .env("CONTAINER_ID", id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: between fork and exec only dup2 (async-signal-safe) on fds that stay open
    // in the parent until spawn returns; dup2 onto 3..5 clears close-on-exec there.
    unsafe {
        cmd.pre_exec(move || {
            // Move the sources above 5 first, so no dup2 overwrites a later source.
            let mut high = [0; 3];
            for (i, fd) in fds.iter().enumerate() {
                let h = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                if h < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high[i] = h;
            }
            for (i, h) in high.iter().enumerate() {
                if libc::dup2(*h, 3 + i as libc::c_int) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| err(format!("cannot start it: {e}")))?;
    drop((out_r, err_r, ready_w));
    // Ready when the program closes fd 5 (EOF here), or it exits.
    let mut ready = File::from(ready_r);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut b = [0u8; 64];
        while let Ok(n) = ready.read(&mut b) {
            if n == 0 {
                break;
            }
        }
        let _ = tx.send(());
    });
    if rx.recv_timeout(READY_TIMEOUT).is_err() {
        let _ = child.kill();
        let _ = child.wait();
        return Err(err(format!("not ready after {READY_TIMEOUT:?}: killed")));
    }
    if let Ok(Some(status)) = child.try_wait() {
        return Err(err(format!("exited before taking the output: {status}")));
    }
    let program = uri.program.clone();
    std::thread::spawn(move || match child.wait() {
        Ok(s) if !s.success() => log::warn!("logging program {program}: {s}"),
        Err(e) => log::warn!("logging program {program}: {e}"),
        Ok(_) => {}
    });
    Ok(BinaryLogger { stdout: File::from(out_w), stderr: File::from(err_w) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn parses_program_and_arguments() {
        let u = BinaryUri::parse("binary:///usr/local/bin/nerdctl?_NERDCTL_INTERNAL_LOGGING=%2Fvar%2Flib%2Fnerdctl&x")
            .unwrap()
            .unwrap();
        assert_eq!(u.program, "/usr/local/bin/nerdctl");
        assert_eq!(u.args, ["_NERDCTL_INTERNAL_LOGGING", "/var/lib/nerdctl", "x"]);
        assert!(BinaryUri::parse("/run/fifo").is_none());
        assert!(BinaryUri::parse("file:///x").is_none());
    }

    #[test]
    fn malformed_uris_are_clear_errors() {
        for (uri, want) in
            [("binary://rel/prog", "not absolute"), ("binary:///p?a=%zz", "percent"), ("binary:///%", "percent")]
        {
            let e = BinaryUri::parse(uri).unwrap().unwrap_err().to_string();
            assert!(e.contains(want), "{uri}: {e}");
        }
    }

    #[test]
    fn the_program_gets_both_streams_and_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "exec 5>&-; echo \"$CONTAINER_ID $CONTAINER_NAMESPACE $1\" > {o}; cat <&3 >> {o}; cat <&4 >> {o}",
            o = out.display()
        );
        let uri = BinaryUri { program: "/bin/sh".into(), args: vec!["-c".into(), script, "sh".into(), "arg1".into()] };
        let mut l = start(&uri, "c1", "ns1").unwrap();
        l.stdout.write_all(b"to-stdout\n").unwrap();
        l.stderr.write_all(b"to-stderr\n").unwrap();
        drop(l);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = std::fs::read_to_string(&out).unwrap_or_default();
            if got == "c1 ns1 arg1\nto-stdout\nto-stderr\n" {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "logger wrote {got:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_missing_program_is_an_error() {
        let missing = BinaryUri { program: "/nonexistent".into(), args: vec![] };
        assert!(start(&missing, "c", "n").err().unwrap().to_string().contains("cannot start"));
    }
}
