//! Tap queues: opening one on /dev/net/tun by interface name (TUNSETIFF, which creates
//! the interface in the calling thread's network namespace if it does not exist), and
//! reading back what a descriptor is attached to (TUNGETIFF).
//!
//! Used by the shim, which creates the pod's taps and hands their descriptors to the VMM,
//! and by the VMM, which opens a tap by name or checks the descriptor it was given. Both
//! want the same kind of queue: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, so every read and
//! write is one Ethernet frame behind a virtio-net header.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

pub const TUN_PATH: &str = "/dev/net/tun";
/// Longest interface name, without the terminating NUL.
pub const MAX_IFNAME_LEN: usize = libc::IFNAMSIZ - 1;
/// `ifr_flags` bits (a C short) of the tun/tap ioctls.
pub const IFF_TAP: libc::c_short = libc::IFF_TAP as libc::c_short;
pub const IFF_TUN: libc::c_short = libc::IFF_TUN as libc::c_short;
pub const IFF_NO_PI: libc::c_short = libc::IFF_NO_PI as libc::c_short;
pub const IFF_VNET_HDR: libc::c_short = libc::IFF_VNET_HDR as libc::c_short;
/// What `open_tap` asks for.
pub const TAP_FLAGS: libc::c_short = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;

#[derive(Debug, thiserror::Error)]
pub enum TapOpenError {
    #[error("interface name {0:?} is empty or longer than {MAX_IFNAME_LEN} bytes")]
    Name(String),
    #[error("cannot open {TUN_PATH}: {0}")]
    OpenTun(#[source] io::Error),
    #[error("TUNSETIFF: {0}")]
    Attach(#[source] io::Error),
}

/// `struct ifreq` with the member the tun/tap ioctls use (`ifr_flags`), padded to the
/// kernel's size (40 bytes on 64-bit).
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

impl IfReq {
    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// Attaches a new close-on-exec descriptor of /dev/net/tun (non-blocking if asked) to
/// the tap `name` with `TAP_FLAGS`, creating the tap if it does not exist. Returns the
/// descriptor and the interface's name as the kernel has it.
pub fn open_tap(name: &str, nonblocking: bool) -> Result<(OwnedFd, String), TapOpenError> {
    if name.is_empty() || name.len() > MAX_IFNAME_LEN {
        return Err(TapOpenError::Name(name.to_string()));
    }
    let flags = libc::O_CLOEXEC | if nonblocking { libc::O_NONBLOCK } else { 0 };
    let file =
        OpenOptions::new().read(true).write(true).custom_flags(flags).open(TUN_PATH).map_err(TapOpenError::OpenTun)?;
    let fd = OwnedFd::from(file);
    let mut req = IfReq { flags: TAP_FLAGS, ..Default::default() };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `req` is one (40 bytes), valid
    // for the whole call, on a descriptor we own.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if ret < 0 {
        return Err(TapOpenError::Attach(io::Error::last_os_error()));
    }
    Ok((fd, req.name()))
}

/// The interface name and `ifr_flags` of the tun/tap queue `fd` is attached to
/// (TUNGETIFF); fails on any other kind of descriptor.
pub fn tap_info(fd: RawFd) -> io::Result<(String, libc::c_short)> {
    let mut req = IfReq::default();
    // SAFETY: TUNGETIFF writes a `struct ifreq` into `req`, which is one; on any other
    // kind of descriptor the ioctl fails without touching it.
    let ret = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((req.name(), req.flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        for bad in ["", "1234567890123456"] {
            assert!(matches!(open_tap(bad, false), Err(TapOpenError::Name(_))), "{bad:?}");
        }
    }

    #[test]
    fn descriptors_that_are_not_taps_have_no_tap_info() {
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(tap_info(file.as_raw_fd()).is_err());
        assert!(tap_info(-1).is_err());
    }

    /// Root only (creating a tap): in a private network namespace of a test thread.
    #[test]
    #[ignore = "needs root (a network namespace and a tap); run as root with --ignored (make unit does)"]
    fn opens_a_tap_with_the_flags_asked_for() {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) with a flag, no memory; namespaces are per thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "{}", io::Error::last_os_error());
            for nonblocking in [false, true] {
                let (fd, name) = open_tap("wisptest0", nonblocking).unwrap();
                assert_eq!(name, "wisptest0");
                let (info_name, flags) = tap_info(fd.as_raw_fd()).unwrap();
                assert_eq!(info_name, "wisptest0");
                assert_eq!(flags & (TAP_FLAGS | IFF_TUN), TAP_FLAGS);
                // SAFETY: fcntl on our own open descriptor.
                let (fl, fd_fl) =
                    unsafe { (libc::fcntl(fd.as_raw_fd(), libc::F_GETFL), libc::fcntl(fd.as_raw_fd(), libc::F_GETFD)) };
                assert_eq!(fl & libc::O_NONBLOCK != 0, nonblocking);
                assert_ne!(fd_fl & libc::FD_CLOEXEC, 0);
            }
        })
        .join()
        .unwrap();
    }
}
