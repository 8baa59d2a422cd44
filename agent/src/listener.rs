//! Listening sockets for the stdio streams: AF_VSOCK in the guest, AF_UNIX on a host
//! (test mode). `std` has no vsock type, so both are plain descriptors behind one small
//! connection type with `Read`/`Write`, half-close and a read timeout.
//!
//! Trusts: nothing about peers; each accepted connection is handed over as-is.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::socket::{
    accept4, bind, listen, setsockopt, shutdown, socket, sockopt, AddressFamily, Backlog, Shutdown, SockFlag, SockType,
    UnixAddr, VsockAddr,
};

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("address {0:?} is not unix:<path> or vsock:<port>")]
    BadAddress(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: nix::Error },
}

/// Where a service listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Unix(PathBuf),
    Vsock(u32),
}

impl ListenAddr {
    /// Parses `unix:/path`, `unix:///path` or `vsock:<port>`.
    pub fn parse(s: &str) -> Result<Self, ListenerError> {
        if let Some(rest) = s.strip_prefix("unix:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(ListenerError::BadAddress(s.into()));
            }
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        if let Some(port) = s.strip_prefix("vsock:") {
            let port = port.trim_start_matches("//").trim_start_matches("-1:");
            return port.parse().map(Self::Vsock).map_err(|_| ListenerError::BadAddress(s.into()));
        }
        Err(ListenerError::BadAddress(s.into()))
    }

    /// The address in ttrpc's syntax.
    pub fn ttrpc_uri(&self) -> String {
        match self {
            Self::Unix(p) => format!("unix://{}", p.display()),
            Self::Vsock(port) => format!("vsock://-1:{port}"),
        }
    }

    /// Removes a stale Unix socket file left by an earlier run.
    pub fn remove_stale(&self) {
        if let Self::Unix(p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub struct StreamListener {
    fd: OwnedFd,
}

impl StreamListener {
    pub fn bind(addr: &ListenAddr) -> Result<Self, ListenerError> {
        let err = |source| ListenerError::Listen { addr: format!("{addr:?}"), source };
        let fd = match addr {
            ListenAddr::Unix(path) => {
                addr.remove_stale();
                let fd = socket(AddressFamily::Unix, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(err)?;
                bind(fd.as_raw_fd(), &UnixAddr::new(path.as_path()).map_err(err)?).map_err(err)?;
                fd
            }
            ListenAddr::Vsock(port) => {
                let fd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(err)?;
                bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, *port)).map_err(err)?;
                fd
            }
        };
        listen(&fd, Backlog::new(64).map_err(err)?).map_err(err)?;
        Ok(Self { fd })
    }

    pub fn accept(&self) -> io::Result<StreamConn> {
        loop {
            match accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new descriptor that we now own.
                Ok(fd) => {
                    return Ok(StreamConn { fd: unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) } })
                }
                Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::ECONNABORTED) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// One accepted stream connection (Unix or vsock).
#[derive(Debug)]
pub struct StreamConn {
    fd: OwnedFd,
}

impl StreamConn {
    #[cfg(test)]
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self { fd: self.fd.try_clone()? })
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        let tv = match t {
            Some(d) => nix::sys::time::TimeVal::new(d.as_secs() as i64, d.subsec_micros() as i64),
            None => nix::sys::time::TimeVal::new(0, 0),
        };
        setsockopt(&self.fd, sockopt::ReceiveTimeout, &tv).map_err(io::Error::from)
    }

    /// Half-closes: `Shutdown::Write` tells the peer "no more data", `Shutdown::Read`
    /// wakes a thread blocked reading.
    pub fn shutdown(&self, how: Shutdown) {
        let _ = shutdown(self.fd.as_raw_fd(), how);
    }
}

impl Read for StreamConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::read(self.fd.as_raw_fd(), buf) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Write for StreamConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            // MSG_NOSIGNAL: a vanished peer is an error, not a SIGPIPE.
            match nix::sys::socket::send(self.fd.as_raw_fd(), buf, nix::sys::socket::MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for StreamConn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for StreamConn {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(ListenAddr::parse("unix:/run/a.sock").unwrap(), ListenAddr::Unix("/run/a.sock".into()));
        assert_eq!(ListenAddr::parse("unix:///run/a.sock").unwrap(), ListenAddr::Unix("/run/a.sock".into()));
        assert_eq!(ListenAddr::parse("vsock:1024").unwrap(), ListenAddr::Vsock(1024));
        assert_eq!(ListenAddr::parse("vsock://-1:1025").unwrap(), ListenAddr::Vsock(1025));
        assert!(ListenAddr::parse("unix:relative").is_err());
        assert!(ListenAddr::parse("tcp:1").is_err());
        assert_eq!(ListenAddr::Unix("/a".into()).ttrpc_uri(), "unix:///a");
        assert_eq!(ListenAddr::Vsock(1024).ttrpc_uri(), "vsock://-1:1024");
    }

    #[test]
    fn conn_half_close_and_timeout() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut a = StreamConn::from_fd(a.into());
        let mut b = StreamConn::from_fd(b.into());
        b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 4];
        assert!(b.read(&mut buf).is_err());
        a.write_all(b"hi").unwrap();
        a.shutdown(Shutdown::Write);
        let mut got = Vec::new();
        b.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"hi");
    }
}
