//! PID 1 duties in the guest, before any service starts.
//!
//! Stage 1 (started by the kernel from the initramfs): container creation needs
//! pivot_root, which cannot leave the initramfs root. So the agent mounts a tmpfs,
//! copies itself into it, frees the initramfs files, moves the tmpfs over `/`
//! (switch_root style: MS_MOVE + chroot) and re-executes itself there.
//! Stage 2: the usual early mounts (proc, sysfs, devtmpfs, devpts with its own ptmx,
//! /dev/shm, cgroup2 with controllers delegated, /run, /tmp), stdio on the console, and
//! the loopback interface.
//!
//! Trusts: the kernel and the initramfs layout (the agent at `/init`, or argv[0]).

use std::ffi::{CString, OsString};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

/// Set in the environment of the re-executed agent (stage 2).
const STAGE_ENV: &str = "WISP_AGENT_STAGE";
const NEW_ROOT: &str = "/newroot";
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;
const CONTROLLERS: [&str; 5] = ["cpu", "cpuset", "memory", "io", "pids"];

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("mounting {what} on {target}: {source}")]
    Mount { what: &'static str, target: String, source: Errno },
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{what}: {source}")]
    Sys { what: &'static str, source: Errno },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Io { what, source }
}

fn mkdir(path: &str, mode: u32) -> Result<(), InitError> {
    match std::fs::DirBuilder::new().recursive(true).mode(mode).create(path) {
        Ok(()) => Ok(()),
        Err(e) => Err(io_err(format!("creating {path}"))(e)),
    }
}

fn mount_fs(
    what: &'static str,
    fstype: &str,
    target: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    mkdir(target, 0o755)?;
    match mount(Some(what), target, Some(fstype), flags, data) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(source) => Err(InitError::Mount { what, target: target.into(), source }),
    }
}

fn root_is_initramfs() -> bool {
    nix::sys::statfs::statfs("/")
        .map(|s| {
            #[allow(clippy::unnecessary_cast)]
            let t = s.filesystem_type().0 as i64;
            t == RAMFS_MAGIC || t == TMPFS_MAGIC
        })
        .unwrap_or(false)
}

/// Stage 1: leaves the initramfs and re-executes; returns only when there is nothing
/// to do (already stage 2, or not started from an initramfs).
pub fn leave_initramfs() -> Result<(), InitError> {
    if std::env::var_os(STAGE_ENV).is_some() || !root_is_initramfs() {
        return Ok(());
    }
    let exe = find_own_binary()?;
    mkdir(NEW_ROOT, 0o755)?;
    mount_fs("tmpfs", "tmpfs", NEW_ROOT, MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs("devtmpfs", "devtmpfs", &format!("{NEW_ROOT}/dev"), MsFlags::MS_NOSUID, Some("mode=0755"))?;
    ensure_stdio(&format!("{NEW_ROOT}/dev"));
    let target = format!("{NEW_ROOT}/init");
    std::fs::copy(&exe, &target).map_err(io_err(format!("copying {} to {target}", exe.display())))?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).map_err(io_err("chmod /init"))?;
    free_initramfs();
    std::env::set_current_dir(NEW_ROOT).map_err(io_err("chdir to the new root"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(|source| InitError::Mount {
        what: "new root",
        target: "/".into(),
        source,
    })?;
    nix::unistd::chroot(".").map_err(|source| InitError::Sys { what: "chroot", source })?;
    std::env::set_current_dir("/").map_err(io_err("chdir /"))?;

    let args: Vec<CString> = std::env::args_os()
        .enumerate()
        .map(|(i, a)| if i == 0 { OsString::from("/init") } else { a })
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).ok()
        })
        .collect();
    env.push(CString::new(format!("{STAGE_ENV}=2")).unwrap_or_default());
    let path = CString::new("/init").unwrap_or_default();
    let err = nix::unistd::execve(&path, &args, &env).unwrap_err();
    Err(InitError::Sys { what: "re-executing the agent from the new root", source: err })
}

fn find_own_binary() -> Result<std::path::PathBuf, InitError> {
    let argv0 = std::env::args_os().next().map(std::path::PathBuf::from);
    for cand in [Some(std::path::PathBuf::from("/init")), argv0].into_iter().flatten() {
        if cand.is_absolute() && cand.is_file() {
            return Ok(cand);
        }
    }
    Err(InitError::Io {
        what: "finding the agent binary in the initramfs (/init or argv[0])".into(),
        source: std::io::ErrorKind::NotFound.into(),
    })
}

/// Deletes the initramfs files (they would stay in RAM forever), staying on the root
/// filesystem and sparing the new root.
fn free_initramfs() {
    let Ok(root_dev) = std::fs::metadata("/").map(|m| m.dev()) else { return };
    let Ok(entries) = std::fs::read_dir("/") else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p == Path::new(NEW_ROOT) {
            continue;
        }
        let Ok(md) = std::fs::symlink_metadata(&p) else { continue };
        if md.dev() != root_dev {
            continue;
        }
        let _ = if md.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
    }
}

/// Makes sure fds 0-2 are open (the kernel leaves them closed when the initramfs has
/// no /dev/console), so later sockets never land on them.
pub fn ensure_stdio(dev_dir: &str) {
    for fd in 0..3 {
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok() {
            continue;
        }
        let console = format!("{dev_dir}/console");
        let null = format!("{dev_dir}/null");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&console)
            .or_else(|_| std::fs::OpenOptions::new().read(true).write(true).open(&null));
        if let Ok(f) = file {
            if f.as_raw_fd() != fd {
                // SAFETY: dup2 onto a closed descriptor number; `f` is closed after.
                unsafe { libc::dup2(f.as_raw_fd(), fd) };
            } else {
                std::mem::forget(f);
            }
        }
    }
}

/// Stage 2: the guest's early mounts, the loopback interface.
pub fn setup_guest() -> Result<(), InitError> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "proc", "/proc", nosuid_nodev_noexec, None)?;
    mount_fs("sysfs", "sysfs", "/sys", nosuid_nodev_noexec, None)?;
    if !Path::new("/dev/null").exists() {
        mount_fs("devtmpfs", "devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    }
    ensure_stdio("/dev");
    mount_fs(
        "devpts",
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )?;
    let _ = std::fs::remove_file("/dev/ptmx");
    std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx").map_err(io_err("linking /dev/ptmx"))?;
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, format!("/dev/{name}"));
    }
    mount_fs("shm", "tmpfs", "/dev/shm", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))?;
    mount_fs("cgroup2", "cgroup2", "/sys/fs/cgroup", nosuid_nodev_noexec, None)?;
    delegate_controllers();
    mount_fs("run", "tmpfs", "/run", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755"))?;
    mount_fs("tmp", "tmpfs", "/tmp", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777"))?;
    mkdir("/etc", 0o755)?;
    if let Err(e) = loopback_up() {
        log::warn!("bringing up the loopback interface: {e}");
    }
    // SAFETY: single-threaded at this point (no service started yet).
    unsafe { std::env::set_var("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin") };
    Ok(())
}

/// Enables the controllers containers need in the root's subtree_control, one at a
/// time so a missing one does not block the others.
fn delegate_controllers() {
    let available = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").unwrap_or_default();
    for c in CONTROLLERS {
        if !available.split_whitespace().any(|a| a == c) {
            log::warn!("cgroup controller {c} is not available in this guest kernel");
            continue;
        }
        if let Err(e) = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", format!("+{c}")) {
            log::warn!("enabling cgroup controller {c}: {e}");
        }
    }
}

fn loopback_up() -> Result<(), InitError> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|source| InitError::Sys { what: "socket", source })?;
    // SAFETY: ifreq is plain data; the ioctls read/write it in place.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(InitError::Sys { what: "SIOCGIFFLAGS lo", source: Errno::last() });
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(InitError::Sys { what: "SIOCSIFFLAGS lo", source: Errno::last() });
        }
    }
    Ok(())
}
