//! Creating the taps the VMM's virtio-net devices use.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};

use super::{NetworkError, Result};

const TUN_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
const TUNSETIFF: libc::c_ulong = nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()) as _;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the tap `name` in the calling thread's network namespace (the namespace of
/// /dev/net/tun at open time).
pub(super) fn open_tap(name: &str) -> Result<OwnedFd> {
    let err = |reason: String| NetworkError::Tap { name: name.into(), reason };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(err("name too long".into()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| err(format!("/dev/net/tun: {e}")))?;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: TUN_FLAGS as libc::c_short, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq is laid out as
    // (name, then the union starting with the flags; 40 bytes), on an fd we own.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(err(format!("TUNSETIFF: {}", std::io::Error::last_os_error())));
    }
    Ok(OwnedFd::from(file))
}
