//! Non-blocking Unix stream operations std does not offer: connecting without ever
//! blocking (a full backlog is an error, not a wait), writing without SIGPIPE, and
//! asking whether the peer has closed both directions.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects a new non-blocking, close-on-exec stream to the listener at `path`. Fails
/// at once if nobody listens there or its backlog is full.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: `sockaddr_un` is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("Unix socket path {} is empty or longer than {} bytes", path.display(), addr.sun_path.len() - 1),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    let addr_len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;

    // SAFETY: no memory is passed; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised `sockaddr_un` that outlives the call and
    // `addr_len` does not exceed its size (checked against `sun_path` above).
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
            addr_len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// `write` that reports a closed peer as `EPIPE` instead of raising SIGPIPE.
pub fn send_nosignal(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes for the duration of the call.
    let rc = unsafe {
        libc::send(stream.as_raw_fd(), buf.as_ptr().cast::<libc::c_void>(), buf.len(), libc::MSG_NOSIGNAL)
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc.unsigned_abs())
    }
}

/// True if the peer can neither send nor receive any more (it closed its end, or shut
/// down both directions), as opposed to a half-close of its sending side.
pub fn peer_hung_up(stream: &UnixStream) -> bool {
    let mut pfd = libc::pollfd { fd: stream.as_raw_fd(), events: 0, revents: 0 };
    // SAFETY: one valid `pollfd`, zero timeout: the call only writes `revents`.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::Shutdown;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connect_reaches_a_listener_and_fails_fast_without_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s_1024");
        assert_eq!(connect_nonblocking(&path).unwrap_err().kind(), io::ErrorKind::NotFound);
        let listener = UnixListener::bind(&path).unwrap();
        let stream = connect_nonblocking(&path).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();
        assert_eq!(send_nosignal(&stream, b"hi").unwrap(), 2);
        let mut buf = [0u8; 2];
        accepted.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        let too_long = dir.path().join("x".repeat(200));
        assert_eq!(connect_nonblocking(&too_long).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn hang_up_distinguishes_half_close_from_close() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        assert!(!peer_hung_up(&ours));
        theirs.shutdown(Shutdown::Write).unwrap();
        assert!(!peer_hung_up(&ours));
        drop(theirs);
        assert!(peer_hung_up(&ours));
        assert_eq!(send_nosignal(&ours, b"x").unwrap_err().kind(), io::ErrorKind::BrokenPipe);
    }
}
