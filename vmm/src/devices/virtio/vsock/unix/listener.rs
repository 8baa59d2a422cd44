//! The listening Unix socket at `uds_path`. Binding replaces a stale socket file left by
//! a VMM that died, but never a regular file, a directory, or a socket someone still
//! listens on. Dropping the listener removes the file if it is still ours.

use std::fs;
use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::{connect_nonblocking, UnixBackendError};

pub struct HostListener {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we created, to recognise it at drop time.
    identity: Option<(u64, u64)>,
}

impl HostListener {
    /// Listens on `path` (non-blocking).
    pub fn bind(path: &Path) -> Result<Self, UnixBackendError> {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if connect_nonblocking(path).is_ok() {
                    return Err(UnixBackendError::InUse(path.to_path_buf()));
                }
                fs::remove_file(path)
                    .map_err(|source| UnixBackendError::RemoveStale { path: path.to_path_buf(), source })?;
            }
            Ok(_) => return Err(UnixBackendError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => return Err(UnixBackendError::Inspect { path: path.to_path_buf(), source }),
        }
        let bind_err = |source| UnixBackendError::Bind { path: path.to_path_buf(), source };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let identity = fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()));
        Ok(Self { listener, path: path.to_path_buf(), identity })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accepts one pending connection as a non-blocking stream.
    pub fn accept(&self) -> io::Result<UnixStream> {
        let (stream, _) = self.listener.accept()?;
        stream.set_nonblocking(true)?;
        Ok(stream)
    }
}

impl AsRawFd for HostListener {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if ours.is_some() && ours == self.identity {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_creates_and_drop_removes_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let listener = HostListener::bind(&path).unwrap();
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_socket());
        assert_eq!(listener.accept().unwrap_err().kind(), ErrorKind::WouldBlock);
        drop(listener);
        assert!(!path.exists());
    }

    #[test]
    fn stale_socket_is_replaced_live_one_and_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        // Stale: a socket file nobody listens on.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let live = HostListener::bind(&path).unwrap();
        // Live: refuses to steal it.
        assert!(matches!(HostListener::bind(&path), Err(UnixBackendError::InUse(_))));
        drop(live);

        let file = dir.path().join("regular");
        fs::write(&file, b"keep me").unwrap();
        assert!(matches!(HostListener::bind(&file), Err(UnixBackendError::NotASocket(_))));
        assert_eq!(fs::read(&file).unwrap(), b"keep me");
        let sub = dir.path().join("dir");
        fs::create_dir(&sub).unwrap();
        assert!(matches!(HostListener::bind(&sub), Err(UnixBackendError::NotASocket(_))));
        let missing_dir = dir.path().join("no/such/dir/v.sock");
        let err = HostListener::bind(&missing_dir).err().unwrap();
        assert!(matches!(err, UnixBackendError::Bind { .. }));
        assert!(err.to_string().contains("no/such/dir/v.sock"));
    }
}
