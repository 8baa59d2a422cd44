//! The host end of a virtio-net device: a Linux tap queue, opened with IFF_TAP |
//! IFF_NO_PI | IFF_VNET_HDR so every read and write is one Ethernet frame behind a
//! 12-byte virtio-net header (the opening and TUNGETIFF are `wisp_netlink::tap`, which
//! the shim uses for the taps it passes in).
//!
//! A `Tap` is either opened here by interface name (created if it does not exist, and
//! then gone when the VMM exits) or taken over from a descriptor the caller passed in,
//! which is checked first: it must be an attached tap with the flags above, or it is
//! refused with a message naming what is wrong. Either way the VMM uses its own
//! close-on-exec, non-blocking descriptor with a vnet header size of 12.
//!
//! `TapLink` is what the device model needs from its host end: a descriptor to read and
//! writev whole frames on, plus TUNSETOFFLOAD. Unit tests implement it with one end of a
//! SOCK_SEQPACKET socketpair, which keeps frame boundaries the same way.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub use wisp_netlink::tap::MAX_IFNAME_LEN;
use wisp_netlink::tap::{open_tap, tap_info, TapOpenError, IFF_NO_PI, IFF_TAP, IFF_TUN, IFF_VNET_HDR, TUN_PATH};

use super::VNET_HDR_LEN;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name '{0}' is not a valid interface name (1 to {MAX_IFNAME_LEN} bytes, no '/', ':' or whitespace)")]
    InvalidName(String),
    #[error("cannot open {TUN_PATH}: {0} (is the tun module loaded, and may this process use it?)")]
    OpenTun(#[source] io::Error),
    #[error("cannot attach to tap {name}: {source}")]
    Attach { name: String, source: io::Error },
    #[error("descriptor {fd} is not open in wisp-vmm: the caller must pass the tap descriptor to it open (inherited)")]
    FdNotOpen { fd: RawFd },
    #[error("descriptor {fd} is not an attached tun/tap queue ({source}); open {TUN_PATH} and TUNSETIFF first")]
    NotTap { fd: RawFd, source: io::Error },
    #[error("descriptor {fd} (interface {name}) {problem}: open {TUN_PATH} with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR")]
    WrongFlags { fd: RawFd, name: String, problem: &'static str },
    #[error("tap {name}: {what}: {source}")]
    Setup { name: String, what: &'static str, source: io::Error },
}

/// What the device model needs from its host end: a descriptor on which each `read` is
/// one frame (vnet header first) and each `writev` sends one, non-blocking.
pub trait TapLink: AsRawFd + Send {
    /// For log messages: "tap wtap0".
    fn label(&self) -> &str;
    /// Tells the host which offloads the guest accepted: TUN_F_* bits (TUNSETOFFLOAD).
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// A tap queue owned by the VMM.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    label: String,
}

/// Whether the kernel would accept `name` for a new interface (`dev_valid_name`).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

fn last_error<T>(ret: libc::c_int, ok: T) -> io::Result<T> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ok)
    }
}

impl Tap {
    /// Attaches to the tap interface `name`, creating it if it does not exist.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if !valid_ifname(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let (fd, kernel_name) = open_tap(name, true).map_err(|e| match e {
            TapOpenError::Name(_) => TapError::InvalidName(name.to_string()),
            TapOpenError::OpenTun(e) => TapError::OpenTun(e),
            TapOpenError::Attach(source) => TapError::Attach { name: name.to_string(), source },
        })?;
        let tap = Self { fd, label: format!("tap {kernel_name}") };
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    /// Takes over the tap queue the caller passed as descriptor `fd`: checks that it is
    /// open and an attached tap with IFF_NO_PI and IFF_VNET_HDR, then works on a
    /// close-on-exec duplicate (the inherited descriptor is marked close-on-exec too, and
    /// otherwise left alone: nothing else in the VMM owns it, so it is never closed twice).
    pub fn from_inherited_fd(fd: RawFd) -> Result<Self, TapError> {
        // SAFETY: F_GETFD only reads the descriptor's flags; an invalid number fails.
        let fd_flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if fd < 0 || fd_flags < 0 {
            return Err(TapError::FdNotOpen { fd });
        }
        let (name, flags) = tap_info(fd).map_err(|source| TapError::NotTap { fd, source })?;
        let wrong = |problem| TapError::WrongFlags { fd, name: name.clone(), problem };
        if flags & IFF_TUN != 0 || flags & IFF_TAP == 0 {
            return Err(wrong("is a tun (layer 3) device, not a tap"));
        }
        if flags & IFF_NO_PI == 0 {
            return Err(wrong("was opened without IFF_NO_PI"));
        }
        if flags & IFF_VNET_HDR == 0 {
            return Err(wrong("was opened without IFF_VNET_HDR"));
        }
        let setup = |what| {
            let name = name.clone();
            move |source| TapError::Setup { name, what, source }
        };
        // SAFETY: plain fcntl calls on a descriptor just checked to be open; results checked.
        unsafe {
            last_error(libc::fcntl(fd, libc::F_SETFD, fd_flags | libc::FD_CLOEXEC), ())
                .map_err(setup("cannot set close-on-exec"))?;
        }
        // SAFETY: as above; F_DUPFD_CLOEXEC returns a new descriptor nothing else owns.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        let dup = last_error(dup, dup).map_err(setup("cannot duplicate the descriptor"))?;
        // SAFETY: `dup` was just created by F_DUPFD_CLOEXEC and is owned by nobody else.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        set_nonblocking(owned.as_raw_fd()).map_err(setup("cannot make the descriptor non-blocking"))?;
        let tap = Self { fd: owned, label: format!("tap {name} (fd {fd})") };
        tap.set_vnet_hdr_len()?;
        Ok(tap)
    }

    fn set_vnet_hdr_len(&self) -> Result<(), TapError> {
        let len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which is valid.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &len) };
        last_error(ret, ()).map_err(|source| TapError::Setup {
            name: self.label.clone(),
            what: "cannot set the vnet header size (TUNSETVNETHDRSZ)",
            source,
        })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl TapLink for Tap {
    fn label(&self) -> &str {
        &self.label
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let ret = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags)) };
        last_error(ret, ())
    }
}

pub(super) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller holds, no memory arguments; results checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    let flags = last_error(flags, flags)?;
    // SAFETY: as above.
    last_error(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }, ())
}

/// Reads one frame (vnet header first) into `buf`; a longer frame is cut to `buf`'s size.
pub(super) fn read_frame(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes one frame gathered from `iov`.
///
/// # Safety
/// Every entry of `iov` must describe memory that stays mapped and readable for the call.
pub(super) unsafe fn write_frame(fd: RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    let count = libc::c_int::try_from(iov.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: the caller guarantees the buffers; `iov` itself is a valid array of `count`.
        let n = unsafe { libc::writev(fd, iov.as_ptr(), count) };
        if n >= 0 {
            return Ok(n as usize);
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

    #[test]
    fn interface_names() {
        for ok in ["wtap0", "a", "tap-pod_1.x", "123456789012345"] {
            assert!(valid_ifname(ok), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "1234567890123456", "tab\t"] {
            assert!(!valid_ifname(bad), "{bad}");
        }
        assert!(matches!(Tap::open("a/b"), Err(TapError::InvalidName(_))));
    }

    #[test]
    fn inherited_descriptors_are_checked_before_use() {
        let err = Tap::from_inherited_fd(-1).unwrap_err();
        assert!(matches!(err, TapError::FdNotOpen { fd: -1 }), "{err}");
        // Find a number that is surely not open.
        let err = Tap::from_inherited_fd(1_000_000).unwrap_err();
        assert!(err.to_string().contains("descriptor 1000000 is not open"), "{err}");
        // An open descriptor that is not a tap is refused and left open.
        let file = std::fs::File::open("/dev/null").unwrap();
        let err = Tap::from_inherited_fd(file.as_raw_fd()).unwrap_err();
        assert!(matches!(err, TapError::NotTap { .. }), "{err}");
        assert!(err.to_string().contains("not an attached tun/tap queue"), "{err}");
        // SAFETY: F_GETFD on our own open descriptor.
        assert!(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFD) } >= 0, "still open");
    }
}
