//! wisp-vmm's confinement, Firecracker's jailer model done by the VMM itself before it
//! opens anything or starts a thread (`--jail DIR`).
//!
//! wisp-vmm parses guest-controlled memory, so it is assumed compromisable once the guest
//! runs. `enter` puts it in new mount, IPC, UTS and network namespaces (the PID namespace
//! comes from whoever starts it: the shim makes it PID 1 of a new one), makes every mount
//! a slave (nothing it mounts reaches the host; mounts the host adds under a share still
//! arrive), mounts an empty tmpfs at DIR, binds into it, *at their host paths*, exactly
//! the files and directories its options name (kernel, initrd, disks, shares, the
//! directories of its sockets and console, `/dev/kvm`), mounts a `/proc` for the
//! passthrough's `/proc/self/fd`, and `pivot_root`s into it, detaching the old root. The
//! options keep their meaning; nothing else of the host is reachable by path, and no
//! directory of the host stays open.
//!
//! `harden` then reduces the process to what running the VM needs: the capability set
//! `KEPT_CAPS` (for the in-process virtio-fs, which acts on the share as guest root),
//! an empty bounding and ambient set, `no_new_privs`, no core dumps (they would hold
//! guest memory).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// How a path is bound into the jail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindKind {
    /// A regular file (kernel, initrd), read-only.
    FileRo,
    /// A disk image or block device, read-write unless `ro`.
    Disk { ro: bool },
    /// A directory shared with the guest, with every mount below it: read-only or not,
    /// always nosuid, nodev, noexec.
    Share { ro: bool },
    /// A directory the VMM creates its sockets and console log in: read-write.
    SocketDir,
    /// A character device the VMM opens (`/dev/kvm`).
    Device,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub kind: BindKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    pub root: PathBuf,
    pub binds: Vec<Bind>,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("--jail {path}: {reason}")]
    Config { path: String, reason: String },
    #[error("jail: {what}: {source}")]
    Sys { what: String, source: io::Error },
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

/// The capabilities wisp-vmm keeps inside the jail, all for the in-process virtio-fs,
/// which carries out guest root's file operations on the share:
/// - CHOWN: chown(2) to the guest's uids and gids;
/// - DAC_OVERRIDE, DAC_READ_SEARCH: read, write and search files whatever their mode,
///   as guest root may;
/// - FOWNER: chmod, utimes and xattrs on files the VMM does not own;
/// - FSETID: keep setuid/setgid bits on the guest's own files when it writes them;
/// - SETUID, SETGID: take the caller's uid and gid (per request) so that files are
///   created with the owner the guest expects.
///
/// Nothing else: not SYS_ADMIN (mounts), not NET_ADMIN (the taps come configured), not
/// MKNOD (device nodes are refused), not KILL, PTRACE or SYS_RESOURCE.
/// (Numbers from linux/capability.h.)
pub const KEPT_CAPS: [(u32, &str); 7] = [
    (0, "chown"),
    (1, "dac_override"),
    (2, "dac_read_search"),
    (3, "fowner"),
    (4, "fsetid"),
    (6, "setgid"),
    (7, "setuid"),
];

/// The `CapEff` bit mask `KEPT_CAPS` gives (as in /proc/PID/status).
pub fn kept_caps_mask() -> u64 {
    KEPT_CAPS.iter().fold(0, |m, (c, _)| m | 1u64 << c)
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = src.map(cstr).transpose()?;
    let dst = cstr(dst)?;
    let fstype = fstype.map(|t| CString::new(t).unwrap_or_default());
    let data = data.map(|d| CString::new(d).unwrap_or_default());
    // SAFETY: mount(2) with NUL-terminated strings or nulls.
    check(unsafe {
        libc::mount(
            src.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            dst.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref().map_or(std::ptr::null(), |s| s.as_ptr() as *const libc::c_void),
        )
    })
}

/// mount_setattr(2) on the mount at `path` and, with `recursive`, every mount below.
fn set_attrs(path: &Path, attrs: u64, recursive: bool) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: mount_attr is plain data.
    let mut a: libc::mount_attr = unsafe { std::mem::zeroed() };
    a.attr_set = attrs;
    let flags = if recursive { libc::AT_RECURSIVE } else { 0 };
    // SAFETY: mount_setattr with a NUL-terminated path and a sized struct.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            flags,
            &a as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    check(r as libc::c_int)
}

impl JailConfig {
    /// Checks the configuration: an absolute, existing, empty jail directory and
    /// absolute bind paths outside it, none of them `/`.
    pub fn validate(&self) -> Result<(), JailError> {
        let root = self.root.display().to_string();
        let cfg = |reason: String| JailError::Config { path: root.clone(), reason };
        if !self.root.is_absolute() || self.root.components().any(|c| c == Component::ParentDir) {
            return Err(cfg("must be an absolute path without '..'".into()));
        }
        let entries = std::fs::read_dir(&self.root).map_err(|e| cfg(format!("not a usable directory: {e}")))?;
        if entries.count() != 0 {
            return Err(cfg("must be an empty directory".into()));
        }
        for b in &self.binds {
            let p = b.path.display();
            if !b.path.is_absolute() || b.path.components().any(|c| c == Component::ParentDir) {
                return Err(cfg(format!("{p}: every path the VMM uses must be absolute (without '..') with --jail")));
            }
            if b.path == Path::new("/") || b.path.starts_with(&self.root) || self.root.starts_with(&b.path) {
                return Err(cfg(format!(
                    "{p}: cannot be bound into the jail (it is / or contains or is inside the jail)"
                )));
            }
        }
        Ok(())
    }

    /// Enters the jail (see the module docs). Must run before any thread starts and
    /// before anything of the VM is opened.
    pub fn enter(&self) -> Result<(), JailError> {
        self.validate()?;
        let flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS | libc::CLONE_NEWNET;
        // SAFETY: unshare(2) with namespace flags only.
        check(unsafe { libc::unshare(flags) }).map_err(sys("unshare (mount, IPC, UTS, network namespaces)"))?;
        mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_SLAVE, None).map_err(sys("making / a slave"))?;
        let root = &self.root;
        let tmpfs_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mount(Some(Path::new("wisp-jail")), root, Some("tmpfs"), tmpfs_flags, Some("mode=0700,size=1m,nr_inodes=4096"))
            .map_err(sys(format!("mounting the jail's tmpfs at {}", root.display())))?;
        for b in &self.binds {
            self.bind(b)?;
        }
        let proc_dir = root.join("proc");
        std::fs::create_dir(&proc_dir).map_err(sys("creating /proc in the jail"))?;
        // Only this PID namespace's processes (the VMM alone when it is PID 1 of its own);
        // `subset=pid` hides the rest of /proc where the kernel supports it.
        let pflags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mount(Some(Path::new("proc")), &proc_dir, Some("proc"), pflags, Some("subset=pid"))
            .or_else(|_| mount(Some(Path::new("proc")), &proc_dir, Some("proc"), pflags, None))
            .map_err(sys("mounting /proc in the jail"))?;
        // pivot_root(".", "."): the old root ends up on top of the new one, and is detached.
        std::env::set_current_dir(root).map_err(sys("entering the jail"))?;
        let dot = c".";
        // SAFETY: pivot_root(2) with two NUL-terminated paths.
        check(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as libc::c_int)
            .map_err(sys("pivot_root into the jail"))?;
        // SAFETY: umount2(2) on ".", now the old root.
        check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) }).map_err(sys("detaching the host's root"))?;
        std::env::set_current_dir("/").map_err(sys("chdir /"))?;
        // The jail's tmpfs is complete: read-only from here on.
        mount(None, Path::new("/"), None, libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | tmpfs_flags, None)
            .map_err(sys("making the jail's root read-only"))?;
        let name = b"wisp-vmm";
        // SAFETY: sethostname with a valid buffer (in our own UTS namespace).
        check(unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) })
            .map_err(sys("sethostname"))?;
        Ok(())
    }

    fn bind(&self, b: &Bind) -> Result<(), JailError> {
        let dst = self.root.join(b.path.strip_prefix("/").unwrap_or(&b.path));
        let what = |w: &str| format!("{w} {} in the jail", b.path.display());
        let meta = std::fs::metadata(&b.path).map_err(sys(format!("{} (bound into the jail)", b.path.display())))?;
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(sys(what("creating the parent of")))?;
        }
        if meta.is_dir() {
            std::fs::create_dir(&dst)
                .or_else(|e| if e.kind() == io::ErrorKind::AlreadyExists { Ok(()) } else { Err(e) })
        } else {
            std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&dst).map(drop)
        }
        .map_err(sys(what("creating the mount point of")))?;
        let recursive = matches!(b.kind, BindKind::Share { .. });
        let flags = libc::MS_BIND | if recursive { libc::MS_REC } else { 0 };
        mount(Some(&b.path), &dst, None, flags, None).map_err(sys(what("binding")))?;
        let mut attrs = libc::MOUNT_ATTR_NOSUID;
        match b.kind {
            BindKind::FileRo => attrs |= libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOEXEC,
            BindKind::Disk { ro } => {
                attrs |= libc::MOUNT_ATTR_NOEXEC;
                if ro {
                    attrs |= libc::MOUNT_ATTR_RDONLY;
                }
                // A block device as a disk needs its device node to work.
                if !std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type()) {
                    attrs |= libc::MOUNT_ATTR_NODEV;
                }
            }
            BindKind::Share { ro } => {
                attrs |= libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOEXEC;
                if ro {
                    attrs |= libc::MOUNT_ATTR_RDONLY;
                }
            }
            BindKind::SocketDir => attrs |= libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOEXEC,
            BindKind::Device => attrs |= libc::MOUNT_ATTR_NOEXEC,
        }
        set_attrs(&dst, attrs, recursive).map_err(sys(what("setting the mount flags of")))?;
        Ok(())
    }
}

/// Reduces the process to what running the VM needs (see the module docs). Threads
/// started afterwards inherit all of it.
pub fn harden() -> Result<(), JailError> {
    let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit reads a valid rlimit.
    check(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) }).map_err(sys("RLIMIT_CORE"))?;
    let keep = kept_caps_mask();
    // The bounding set first (dropping from it needs CAP_SETPCAP, still held).
    for cap in 0..=63u32 {
        if keep & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments; EINVAL past the last capability.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(JailError::Sys { what: format!("dropping capability {cap} from the bounding set"), source: e });
        }
    }
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) })
        .map_err(sys("clearing the ambient capabilities"))?;
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let hdr = Header { version: VERSION_3, pid: 0 };
    let lo = Data { effective: keep as u32, permitted: keep as u32, inheritable: 0 };
    let hi = Data { effective: (keep >> 32) as u32, permitted: (keep >> 32) as u32, inheritable: 0 };
    let data = [lo, hi];
    // SAFETY: capset(2) with a version-3 header and two data structs.
    check(unsafe { libc::syscall(libc::SYS_capset, &hdr as *const Header, data.as_ptr()) } as libc::c_int)
        .map_err(sys("capset"))?;
    // SAFETY: prctl with integer arguments.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }).map_err(sys("no_new_privs"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(root: &Path, binds: &[(&str, BindKind)]) -> JailConfig {
        JailConfig { root: root.into(), binds: binds.iter().map(|(p, k)| Bind { path: p.into(), kind: *k }).collect() }
    }

    #[test]
    fn bad_jail_configs_are_named() {
        let d = tempfile::tempdir().unwrap();
        let e = cfg(Path::new("jail"), &[]).validate().unwrap_err().to_string();
        assert!(e.contains("absolute"), "{e}");
        std::fs::write(d.path().join("x"), b"").unwrap();
        let e = cfg(d.path(), &[]).validate().unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let j = d.path().join("j");
        std::fs::create_dir(&j).unwrap();
        for bad in ["relative/vmlinux", "/", "/a/../etc"] {
            let e = cfg(&j, &[(bad, BindKind::FileRo)]).validate().unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        let inside = j.join("k").display().to_string();
        assert!(cfg(&j, &[(&inside, BindKind::SocketDir)]).validate().is_err());
        let outer = d.path().display().to_string();
        assert!(cfg(&j, &[(&outer, BindKind::SocketDir)]).validate().is_err());
        cfg(&j, &[("/usr/share/x", BindKind::FileRo)]).validate().unwrap();
    }

    #[test]
    fn the_kept_capabilities_are_the_ones_named() {
        // CapEff of a jailed wisp-vmm, as /proc/PID/status shows it.
        assert_eq!(kept_caps_mask(), 0xdf);
    }

    /// Needs root: enters a jail in a forked child and reports what it sees.
    #[test]
    #[ignore = "needs root (namespaces, mounts)"]
    fn a_jailed_process_sees_only_its_binds_and_keeps_only_its_capabilities() {
        let d = tempfile::tempdir().unwrap();
        let jail = d.path().join("jail");
        let share = d.path().join("share");
        let socks = d.path().join("socks");
        let secret = d.path().join("secret");
        for p in [&jail, &share, &socks] {
            std::fs::create_dir(p).unwrap();
        }
        std::fs::write(&secret, b"x").unwrap();
        std::fs::write(share.join("f"), b"shared").unwrap();
        let kernel = d.path().join("vmlinux");
        std::fs::write(&kernel, b"kernel").unwrap();
        let c = JailConfig {
            root: jail.clone(),
            binds: vec![
                Bind { path: kernel.clone(), kind: BindKind::FileRo },
                Bind { path: share.clone(), kind: BindKind::Share { ro: false } },
                Bind { path: socks.clone(), kind: BindKind::SocketDir },
            ],
        };
        // SAFETY: fork in a test; the child only runs the checks and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = (|| -> Result<(), String> {
                c.enter().map_err(|e| e.to_string())?;
                harden().map_err(|e| e.to_string())?;
                let ok = |b: bool, what: &str| if b { Ok(()) } else { Err(what.to_string()) };
                ok(std::fs::read(&kernel).map_err(|e| e.to_string())? == b"kernel", "kernel content")?;
                ok(std::fs::write(&kernel, b"y").is_err(), "kernel writable")?;
                ok(std::fs::read(share.join("f")).map_err(|e| e.to_string())? == b"shared", "share content")?;
                std::fs::write(share.join("g"), b"from the jail").map_err(|e| e.to_string())?;
                std::fs::write(socks.join("s"), b"").map_err(|e| e.to_string())?;
                ok(!secret.exists(), "an unbound host file is visible")?;
                ok(!Path::new("/etc/passwd").exists(), "the host's /etc is visible")?;
                ok(std::fs::write("/newfile", b"").is_err(), "the jail root is writable")?;
                let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
                let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap_or("").trim().to_string();
                ok(u64::from_str_radix(&eff, 16).ok() == Some(kept_caps_mask()), &format!("CapEff {eff}"))?;
                ok(status.lines().any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')), "NoNewPrivs")?;
                Ok(())
            })();
            if let Err(e) = &code {
                eprintln!("jailed child: {e}");
            }
            // SAFETY: _exit in the forked child.
            unsafe { libc::_exit(if code.is_ok() { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waitpid on our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the jailed child failed (status {status:#x})"
        );
        assert_eq!(std::fs::read(share.join("g")).unwrap(), b"from the jail");
        assert!(socks.join("s").exists());
        assert_eq!(std::fs::read_dir(&jail).unwrap().count(), 0, "the jail's mounts leaked to the host");
    }
}
