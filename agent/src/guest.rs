//! Guest-wide settings the host asks for: wall clock, hostname, the shared filesystem,
//! resolv.conf, network sysctls, and the guest details report; plus the final reboot.
//! These change the whole machine, so the agent does them only as the guest's PID 1,
//! never in host test mode.
//!
//! Trusts: nothing in the values; each is bounded and checked before use.

use std::io;
use std::path::Path;

use nix::mount::{mount, MsFlags};
use wisp_protocols::agent::GuestDetailsResponse;

pub const DEFAULT_SHARED_MOUNT: &str = "/run/wisp/shared";

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("{0}")]
    Invalid(String),
    #[error("setting the guest clock: {0}")]
    Clock(nix::Error),
    #[error("setting the hostname: {0}")]
    Hostname(nix::Error),
    #[error("mounting virtio-fs tag {tag:?} on {mount_point}: {source} (is the VMM's fs device present?)")]
    SharedFs { tag: String, mount_point: String, source: nix::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> GuestError {
    let what = what.into();
    move |source| GuestError::Io { what, source }
}

pub fn set_time(sec: i64, nsec: u32) -> Result<(), GuestError> {
    if sec <= 0 || nsec >= 1_000_000_000 {
        return Err(GuestError::Invalid(format!("time {sec}.{nsec:09} is not a valid wall-clock time")));
    }
    let ts = nix::sys::time::TimeSpec::new(sec, nsec as i64);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(GuestError::Clock)
}

/// The most host entropy `add_entropy` takes.
pub const MAX_ENTROPY_BYTES: usize = 512;

/// Checks host entropy for `add_entropy`: at most `MAX_ENTROPY_BYTES`.
pub fn check_entropy(bytes: &[u8]) -> Result<(), GuestError> {
    if bytes.len() > MAX_ENTROPY_BYTES {
        return Err(GuestError::Invalid(format!(
            "entropy of {} bytes: at most {MAX_ENTROPY_BYTES} are taken",
            bytes.len()
        )));
    }
    Ok(())
}

/// Adds `bytes` from the host to the kernel's entropy pool and credits them in full
/// (RNDADDENTROPY on /dev/random): the host's random bytes are as good as the guest's
/// own, and a restored clone must not go on from its template's pool. Then reseeds the
/// kernel's CRNG from the pool at once (RNDRESEEDCRNG): once ready, the kernel reseeds
/// only on a timer (every second or more early in a boot, every minute later), and the
/// guest time of a restored clone goes on from its template's, so until then every
/// clone would draw from the template's CRNG key (the same bytes from /dev/urandom,
/// getrandom and the kernel's own users).
pub fn add_entropy(bytes: &[u8]) -> Result<(), GuestError> {
    check_entropy(bytes)?;
    if bytes.is_empty() {
        return Ok(());
    }
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info: Vec<u32> = Vec::with_capacity(2 + bytes.len().div_ceil(4));
    info.push((bytes.len() * 8) as u32);
    info.push(bytes.len() as u32);
    let mut words = vec![0u8; bytes.len().div_ceil(4) * 4];
    words[..bytes.len()].copy_from_slice(bytes);
    info.extend(words.chunks(4).map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]])));
    let random = std::fs::OpenOptions::new().write(true).open("/dev/random").map_err(io_err("opening /dev/random"))?;
    // RNDADDENTROPY = _IOW('R', 0x03, int[2])
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
    // SAFETY: the ioctl reads the header and `buf_size` bytes after it, all inside `info`.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&random), RNDADDENTROPY, info.as_ptr()) };
    if r != 0 {
        return Err(GuestError::Io {
            what: "adding host entropy (RNDADDENTROPY)".into(),
            source: io::Error::last_os_error(),
        });
    }
    // RNDRESEEDCRNG = _IO('R', 0x07) (Linux 4.17+; needs CAP_SYS_ADMIN, which PID 1 has).
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: the ioctl takes no argument.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&random), RNDRESEEDCRNG) };
    if r != 0 {
        return Err(GuestError::Io {
            what: "reseeding the kernel's CRNG (RNDRESEEDCRNG)".into(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

pub fn set_hostname(name: &str) -> Result<(), GuestError> {
    if name.is_empty() || name.len() > 64 || name.contains(['\0', '/']) {
        return Err(GuestError::Invalid(format!("hostname {name:?} is not valid (1-64 bytes, no '/')")));
    }
    nix::unistd::sethostname(name).map_err(GuestError::Hostname)
}

pub fn mount_shared_fs(tag: &str, mount_point: &Path) -> Result<(), GuestError> {
    if tag.is_empty() || tag.len() > 36 || tag.contains('\0') {
        return Err(GuestError::Invalid(format!("virtio-fs tag {tag:?} is not valid (1-36 bytes)")));
    }
    if !mount_point.is_absolute() || mount_point.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(GuestError::Invalid(format!(
            "shared filesystem mount point {mount_point:?} must be an absolute path"
        )));
    }
    std::fs::create_dir_all(mount_point).map_err(io_err(format!("creating {}", mount_point.display())))?;
    // Neither nosuid nor nodev: containers' root filesystems come from here and keep
    // their image's semantics in the guest, as with runc (a setuid `su` or `ping` works
    // for a non-root user). The host side is what must never honour the guest's setuid
    // files or device nodes: every host mount below the share is nosuid,nodev.
    mount(Some(tag), mount_point, Some("virtiofs"), MsFlags::empty(), None::<&str>).map_err(
        |source| GuestError::SharedFs { tag: tag.into(), mount_point: mount_point.display().to_string(), source },
    )?;
    raise_read_ahead(mount_point);
    Ok(())
}

/// Sequential reads through virtio-fs are bounded by the read-ahead window: the
/// kernel's 128 KiB default means one small FUSE request at a time, and measured here
/// 1 MiB reads about 3x faster. Best effort: a guest without the knob still works.
pub const SHARED_FS_READ_AHEAD_KB: u32 = 1024;

fn raise_read_ahead(mount_point: &Path) {
    use std::os::unix::fs::MetadataExt;
    let dev = match std::fs::metadata(mount_point) {
        Ok(m) => m.dev(),
        Err(e) => {
            log::warn!("read-ahead of {}: {e}", mount_point.display());
            return;
        }
    };
    let knob = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
    if let Err(e) = std::fs::write(&knob, SHARED_FS_READ_AHEAD_KB.to_string()) {
        log::warn!("setting {knob}: {e}");
    }
}

/// Writes one already-validated sysctl (see `spec::sysctl_path`).
pub fn apply_sysctl(key: &str, value: &str) -> Result<(), GuestError> {
    let path = crate::spec::sysctl_path(key);
    std::fs::write(&path, value).map_err(io_err(format!("setting sysctl {key}")))
}

pub fn details(cgroup_controllers: Vec<String>) -> GuestDetailsResponse {
    let uname = nix::sys::utsname::uname().ok();
    let kernel_release = uname.map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let rss_pages: u64 = statm.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    GuestDetailsResponse {
        kernel_release,
        mem_total_bytes: mem_total_kib * 1024,
        cpus,
        cgroup_controllers,
        agent_rss_bytes: rss_pages * page,
        ..Default::default()
    }
}

/// The cgroup controllers available to containers.
pub fn cgroup_controllers() -> Vec<String> {
    let v2 = Path::new(crate::cgroup::CGROUP_ROOT).join("cgroup.controllers");
    if let Ok(text) = std::fs::read_to_string(v2) {
        return text.split_whitespace().map(String::from).collect();
    }
    let mut names: Vec<String> = std::fs::read_to_string("/proc/cgroups")
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split_whitespace().nth(3) == Some("1"))
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect();
    names.sort();
    names
}

/// Ends the VM: the VMM treats a guest reboot as the VM's end (the kernel runs with
/// `reboot=k`; there is no ACPI, so a power-off would hang).
pub fn reboot() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Only reached if reboot failed (not PID 1 or no permission).
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both ioctls on this machine's kernel (root only: RNDADDENTROPY and RNDRESEEDCRNG
    /// need CAP_SYS_ADMIN; what they add to this host's pool is random bytes too).
    #[test]
    #[ignore = "needs root (CAP_SYS_ADMIN); run as root with --ignored (make unit does)"]
    fn host_entropy_is_credited_and_the_crng_reseeded() {
        let mut bytes = [0u8; 64];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").unwrap(), &mut bytes).unwrap();
        add_entropy(&bytes).expect("RNDADDENTROPY and RNDRESEEDCRNG");
    }

    #[test]
    fn bad_values_are_refused_before_touching_the_machine() {
        assert!(matches!(set_time(0, 0), Err(GuestError::Invalid(_))));
        assert!(matches!(set_time(1, 1_000_000_000), Err(GuestError::Invalid(_))));
        assert!(matches!(set_hostname(""), Err(GuestError::Invalid(_))));
        assert!(matches!(set_hostname(&"h".repeat(65)), Err(GuestError::Invalid(_))));
        assert!(matches!(mount_shared_fs("", Path::new("/x")), Err(GuestError::Invalid(_))));
        assert!(matches!(mount_shared_fs("tag", Path::new("rel")), Err(GuestError::Invalid(_))));
        let e = add_entropy(&[7; MAX_ENTROPY_BYTES + 1]).unwrap_err().to_string();
        assert_eq!(e, "entropy of 513 bytes: at most 512 are taken");
        assert!(add_entropy(&[]).is_ok(), "nothing to add touches nothing");
    }

    #[test]
    fn details_report_this_machine() {
        let d = details(vec!["memory".into()]);
        assert!(d.mem_total_bytes > 0);
        assert!(d.cpus >= 1);
        assert!(!d.kernel_release.is_empty());
        assert!(d.agent_rss_bytes > 0);
    }
}
