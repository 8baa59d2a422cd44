//! Host filesystem operations that a hostile guest cannot redirect.
//!
//! The shim runs as root on the host and works below a sandbox's state directory, part
//! of which the guest can reach through virtio-fs. Whatever the guest can write, it can
//! rename, and it can plant symlinks there. So nothing here takes a path string from
//! the root down: every operation starts at a directory fd ([`Dir`]) and resolves what
//! is below it with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
//! | RESOLVE_NO_XDEV)` (no symlink, no `..` out, no mount crossed), creates with
//! `O_EXCL | O_NOFOLLOW`, mounts onto the fd it resolved (`/proc/self/fd/N`, or
//! `move_mount` for binds), unmounts only a mount whose id it recorded, and removes trees
//! by an fd walk that never follows a symlink and stops at a mount.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// openat2's resolution flags for everything below a `Dir`.
const BENEATH: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{} contains a NUL byte", p.display())))
}

fn cvt(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Wraps an error with the path it concerns (`what` names the operation).
fn at(what: &str, p: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", p.display()))
}

/// A relative path of plain names only: no `..`, no root, no `.` games.
fn check_relative(rel: &Path) -> io::Result<()> {
    if rel.as_os_str().is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{:?} is not a plain relative path", rel)));
    }
    Ok(())
}

/// `openat2(dir, rel, flags, BENEATH)`.
fn openat2(dir: BorrowedFd<'_>, rel: &Path, flags: i32, resolve: u64) -> io::Result<OwnedFd> {
    let c = cstr(rel)?;
    // SAFETY: open_how is plain data; zeroed is a valid value, the fields we use are set.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    // O_NOFOLLOW with O_PATH would return a trailing symlink itself; without it,
    // RESOLVE_NO_SYMLINKS refuses it (ELOOP) like every other component.
    let nofollow = if flags & libc::O_PATH != 0 { 0 } else { libc::O_NOFOLLOW };
    how.flags = (flags | libc::O_CLOEXEC | nofollow) as u64;
    how.resolve = resolve;
    // SAFETY: openat2 with a valid dirfd, a NUL-terminated path and a properly sized struct.
    let fd = cvt(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    })?;
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The id of the mount `fd` is on (`statx` `STATX_MNT_ID`).
pub fn mount_id(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: statx fills the zeroed struct; the empty path with AT_EMPTY_PATH means `fd`.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            &mut st,
        )
    };
    cvt(r as libc::c_long)?;
    if st.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(io::Error::other("the kernel did not report a mount id (needs Linux >= 5.8)"));
    }
    Ok(st.stx_mnt_id)
}

/// `/proc/self/fd/N`: a path that names exactly the object `fd` refers to.
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// A directory the shim works below, held open.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    /// The host path it was opened at, for messages only (never resolved again).
    path: PathBuf,
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Dir {
    /// Opens a directory the shim itself created or trusts (its own state directory):
    /// the last component must not be a symlink.
    pub fn open_trusted(path: &Path) -> io::Result<Self> {
        let c = cstr(path)?;
        // SAFETY: open(2) with a NUL-terminated path.
        let fd =
            unsafe { libc::open(c.as_ptr(), libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_RDONLY) };
        let fd = cvt(fd as libc::c_long).map_err(|e| at("opening", path, e))?;
        // SAFETY: the kernel just returned this fd.
        Ok(Self { fd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) }, path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the directory `rel` below this one (no symlink, no mount crossed).
    pub fn open_dir(&self, rel: &Path) -> io::Result<Dir> {
        check_relative(rel)?;
        let fd = openat2(self.as_fd(), rel, libc::O_DIRECTORY | libc::O_RDONLY, BENEATH)
            .map_err(|e| at("opening", &self.path.join(rel), e))?;
        Ok(Dir { fd, path: self.path.join(rel) })
    }

    /// An `O_PATH` fd of `rel` below this one, to mount onto. The parent is resolved
    /// without crossing a mount; the last component may itself be a mount point (its
    /// root is what is returned), never a symlink.
    pub fn open_target(&self, rel: &Path) -> io::Result<OwnedFd> {
        self.open_last(rel, libc::O_PATH)
    }

    /// Opens the directory `rel` below this one whose last component is a mount point
    /// (the mount's root is returned), resolved like `open_target`.
    pub fn open_mounted_dir(&self, rel: &Path) -> io::Result<Dir> {
        let fd = self.open_last(rel, libc::O_DIRECTORY | libc::O_RDONLY)?;
        Ok(Dir { fd, path: self.path.join(rel) })
    }

    /// `rel`'s parent resolved without symlinks or mount crossings, then its last
    /// component without symlinks (crossing into what is mounted there) with `flags`.
    fn open_last(&self, rel: &Path, flags: i32) -> io::Result<OwnedFd> {
        check_relative(rel)?;
        let (parent, name) = split(rel)?;
        let err = |e| at("opening", &self.path.join(rel), e);
        let p = match parent {
            Some(p) => openat2(self.as_fd(), p, libc::O_DIRECTORY | libc::O_PATH, BENEATH),
            None => self.dup(),
        }
        .map_err(err)?;
        let resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        openat2(p.as_fd(), name, flags, resolve).map_err(err)
    }

    fn dup(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// Creates the directories of `rel` that are missing, each with `mode`, and
    /// returns the last. An existing component must be a real directory on the same
    /// mount (a symlink or a mount point is an error, never followed).
    pub fn mkdir_all(&self, rel: &Path, mode: u32) -> io::Result<Dir> {
        check_relative(rel)?;
        let mut cur = Dir { fd: self.dup()?, path: self.path.clone() };
        for c in rel.components() {
            let name = Path::new(c.as_os_str());
            let cname = cstr(name)?;
            // SAFETY: mkdirat with a valid dirfd and a NUL-terminated single name.
            let r = unsafe { libc::mkdirat(cur.fd.as_raw_fd(), cname.as_ptr(), mode) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(at("creating", &cur.path.join(name), e));
                }
            } else {
                // The mode is exactly `mode`, whatever the umask.
                let fd = openat2(cur.as_fd(), name, libc::O_DIRECTORY | libc::O_RDONLY, BENEATH)
                    .map_err(|e| at("opening", &cur.path.join(name), e))?;
                // SAFETY: fchmod on an fd we own.
                cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) } as libc::c_long)
                    .map_err(|e| at("chmod", &cur.path.join(name), e))?;
                cur = Dir { fd, path: cur.path.join(name) };
                continue;
            }
            cur = cur.open_dir(name)?;
        }
        Ok(cur)
    }

    /// Creates the empty file `rel` (its parent must exist): `O_CREAT | O_EXCL |
    /// O_NOFOLLOW`, so an existing name, symlink or not, is an error.
    pub fn create_file(&self, rel: &Path, mode: u32) -> io::Result<()> {
        check_relative(rel)?;
        let (parent, name) = split(rel)?;
        let p = match parent {
            Some(p) => self.open_dir(p)?.fd,
            None => self.dup()?,
        };
        let cname = cstr(name)?;
        // SAFETY: openat with a valid dirfd and a single NUL-terminated name.
        let fd = unsafe {
            libc::openat(
                p.as_raw_fd(),
                cname.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_WRONLY,
                mode,
            )
        };
        let fd = cvt(fd as libc::c_long).map_err(|e| at("creating", &self.path.join(rel), e))?;
        // SAFETY: the kernel just returned this fd; closing it is all we do.
        drop(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        Ok(())
    }

    /// Opens `rel` below this one as a file, resolved like `open_dir` (no symlink at
    /// any component, the last one included; no mount crossed), with `flags` (and
    /// `mode` when they create it). Add `O_NONBLOCK` to open a name another process
    /// controls for reading: a FIFO put there then cannot block the open.
    pub fn open_file(&self, rel: &Path, flags: i32, mode: u32) -> io::Result<std::fs::File> {
        check_relative(rel)?;
        let c = cstr(rel)?;
        // SAFETY: open_how is plain data; zeroed is a valid value, the fields we use are set.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
        if flags & libc::O_CREAT != 0 {
            how.mode = u64::from(mode);
        }
        how.resolve = BENEATH;
        // SAFETY: openat2 with a valid dirfd, a NUL-terminated path and a properly sized struct.
        let fd = cvt(unsafe {
            libc::syscall(
                libc::SYS_openat2,
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        })
        .map_err(|e| at("opening", &self.path.join(rel), e))?;
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        Ok(unsafe { std::fs::File::from_raw_fd(fd as RawFd) })
    }

    /// Renames the entry `name` of this directory to `new` in `to` (`renameat2` with
    /// `flags`: `RENAME_NOREPLACE`, `RENAME_EXCHANGE`). Single names only; the entry
    /// itself moves, a symlink as a symlink. The error keeps its errno (EEXIST for a
    /// taken name under `RENAME_NOREPLACE`).
    pub fn rename(&self, name: &str, to: &Dir, new: &str, flags: libc::c_uint) -> io::Result<()> {
        let single = |n: &str| {
            let p = Path::new(n);
            check_relative(p)?;
            if p.components().count() != 1 {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{n:?} is not a single name")));
            }
            cstr(p)
        };
        let (o, n) = (single(name)?, single(new)?);
        // SAFETY: renameat2 between two directory fds with NUL-terminated single names.
        cvt(unsafe {
            libc::syscall(libc::SYS_renameat2, self.fd.as_raw_fd(), o.as_ptr(), to.fd.as_raw_fd(), n.as_ptr(), flags)
        })
        .map(drop)
    }

    /// Removes `rel` and everything below it, never following a symlink (a symlink is
    /// removed as a name) and never entering anything mounted: a mount point below is
    /// an error and everything on it stays. A missing `rel` is not an error.
    pub fn remove_tree(&self, rel: &Path) -> io::Result<()> {
        check_relative(rel)?;
        let (parent, name) = split(rel)?;
        let p = match parent {
            Some(p) => match self.open_dir(p) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            },
            None => Dir { fd: self.dup()?, path: self.path.clone() },
        };
        let mnt = mount_id(p.as_fd())?;
        remove_entry(&p, name, mnt)
    }
}

/// Splits `rel` into its parent (None for a single name) and last name.
fn split(rel: &Path) -> io::Result<(Option<&Path>, &Path)> {
    let name = rel
        .file_name()
        .map(Path::new)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{:?} has no name", rel)))?;
    let parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
    Ok((parent, name))
}

/// Removes the entry `name` of `dir`, recursively if it is a directory on mount `mnt`.
fn remove_entry(dir: &Dir, name: &Path, mnt: u64) -> io::Result<()> {
    let cname = cstr(name)?;
    // SAFETY: fstatat with a valid dirfd, a single name, AT_SYMLINK_NOFOLLOW.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstatat(dir.fd.as_raw_fd(), cname.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(at("stat", &dir.path.join(name), e)) };
    }
    let mut flags = 0;
    if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
        // O_NOFOLLOW | O_DIRECTORY: if the name was swapped for a symlink since the
        // stat, this fails instead of following it.
        let child = openat2(
            dir.as_fd(),
            name,
            libc::O_DIRECTORY | libc::O_RDONLY,
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
        )
        .map_err(|e| at("opening", &dir.path.join(name), e))?;
        let child = Dir { fd: child, path: dir.path.join(name) };
        if mount_id(child.as_fd())? != mnt {
            return Err(io::Error::other(format!(
                "{} is a mount point: not removing what is mounted there",
                child.path.display()
            )));
        }
        remove_children(&child, mnt)?;
        flags = libc::AT_REMOVEDIR;
    }
    // SAFETY: unlinkat with a valid dirfd and a single name.
    if unsafe { libc::unlinkat(dir.fd.as_raw_fd(), cname.as_ptr(), flags) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::NotFound {
            return Err(at("removing", &dir.path.join(name), e));
        }
    }
    Ok(())
}

fn remove_children(dir: &Dir, mnt: u64) -> io::Result<()> {
    let names = list(dir)?;
    let mut first_err = None;
    for n in names {
        if let Err(e) = remove_entry(dir, Path::new(std::ffi::OsStr::from_bytes(n.to_bytes())), mnt) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// The names in a directory (without `.` and `..`).
fn list(dir: &Dir) -> io::Result<Vec<CString>> {
    let fd = openat2(dir.as_fd(), Path::new("."), libc::O_DIRECTORY | libc::O_RDONLY, BENEATH)
        .map_err(|e| at("opening", &dir.path, e))?;
    // SAFETY: fdopendir takes ownership of the fd on success.
    let raw = fd.as_raw_fd();
    let d = unsafe { libc::fdopendir(raw) };
    if d.is_null() {
        return Err(at("reading", &dir.path, io::Error::last_os_error()));
    }
    std::mem::forget(fd);
    let mut out = Vec::new();
    loop {
        // SAFETY: readdir on the DIR* we opened; errno distinguishes end from error.
        unsafe { *libc::__errno_location() = 0 };
        let ent = unsafe { libc::readdir64(d) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: closedir on the DIR* we own (closes the fd too).
            unsafe { libc::closedir(d) };
            if e.raw_os_error().unwrap_or(0) != 0 {
                return Err(at("reading", &dir.path, e));
            }
            return Ok(out);
        }
        // SAFETY: d_name is NUL-terminated within the dirent the kernel filled.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            out.push(name.to_owned());
        }
    }
}

/// Mount attributes every host mount below a sandbox gets: nothing the guest made is
/// honoured as setuid or as a device on the host.
pub const GUARD: u64 = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;

/// Mount attributes of a bind: `tree` on every mount of the bound tree (`GUARD`, plus
/// `MOUNT_ATTR_RDONLY` for a recursively read-only bind, so no submount stays writable or
/// setuid), `top` on its top mount alone (`MOUNT_ATTR_RDONLY` for a plain read-only bind,
/// whose submounts keep their own, as with runc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindAttrs {
    pub tree: u64,
    pub top: u64,
}

impl BindAttrs {
    /// `attrs` on every mount of the tree.
    pub const fn all(attrs: u64) -> Self {
        Self { tree: attrs, top: 0 }
    }
}

/// Bind-mounts `source` (a host path from the container spec, which may itself hold
/// mounts: with `recursive` they come along) onto `target`, with `attrs` applied before
/// the tree is attached (no moment where it is writable or setuid). Returns the new
/// mount's id.
pub fn bind(source: &Path, target: BorrowedFd<'_>, attrs: BindAttrs, recursive: bool) -> io::Result<u64> {
    let c = cstr(source)?;
    attach_clone(libc::AT_FDCWD, &c, 0, target, attrs, recursive).map_err(|e| at("bind-mounting", source, e))
}

/// Like `bind`, with the source given as an open directory.
pub fn bind_fd(source: BorrowedFd<'_>, target: BorrowedFd<'_>, attrs: BindAttrs, recursive: bool) -> io::Result<u64> {
    attach_clone(source.as_raw_fd(), c"", libc::AT_EMPTY_PATH as libc::c_uint, target, attrs, recursive)
}

/// open_tree(OPEN_TREE_CLONE) + mount_setattr + move_mount.
fn attach_clone(
    dirfd: RawFd,
    path: &CStr,
    extra: libc::c_uint,
    target: BorrowedFd<'_>,
    attrs: BindAttrs,
    recursive: bool,
) -> io::Result<u64> {
    let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | extra;
    if recursive {
        flags |= libc::AT_RECURSIVE as libc::c_uint;
    }
    // SAFETY: open_tree with a NUL-terminated path; returns a new fd or -1.
    let tree = cvt(unsafe { libc::syscall(libc::SYS_open_tree, dirfd, path.as_ptr(), flags) })
        .map_err(|e| io::Error::new(e.kind(), format!("cloning the mount tree: {e}")))?;
    // SAFETY: the kernel just returned this fd.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as RawFd) };
    set_attrs(tree.as_fd(), attrs.tree, true)
        .map_err(|e| io::Error::new(e.kind(), format!("setting its mount flags: {e}")))?;
    if attrs.top != 0 {
        set_attrs(tree.as_fd(), attrs.top, false)
            .map_err(|e| io::Error::new(e.kind(), format!("setting its top mount's flags: {e}")))?;
    }
    let id = mount_id(tree.as_fd())?;
    // SAFETY: move_mount with two valid fds and empty paths.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH,
        )
    })
    .map_err(|e| io::Error::new(e.kind(), format!("attaching it: {e}")))?;
    Ok(id)
}

/// `mount_setattr`: sets `attrs` on the mount `fd` is the root of (and on every mount
/// below it with `recursive`).
pub fn set_attrs(fd: BorrowedFd<'_>, attrs: u64, recursive: bool) -> io::Result<()> {
    // SAFETY: mount_attr is plain data.
    let mut a: libc::mount_attr = unsafe { std::mem::zeroed() };
    a.attr_set = attrs;
    let flags = libc::AT_EMPTY_PATH | if recursive { libc::AT_RECURSIVE } else { 0 };
    // SAFETY: mount_setattr with a valid fd, an empty path and a sized struct.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            flags,
            &a as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    })?;
    Ok(())
}

/// Mounts a filesystem (`fstype` from `source` with `data`, as containerd describes
/// a rootfs) onto the directory `target`, with `nosuid,nodev` added to `flags`.
/// `target` is an fd from `Dir::open_target`: the mount goes exactly there.
pub fn mount_fs(
    source: Option<&str>,
    target: BorrowedFd<'_>,
    fstype: &str,
    flags: nix::mount::MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    use nix::mount::MsFlags;
    let flags = flags | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    nix::mount::mount(source, &fd_path(target), Some(fstype), flags, data).map_err(io::Error::from)
}

/// Unmounts the mount at `rel` below `dir`, but only if it is the one recorded (`id`):
/// anything else found there (the mount was replaced, or was never ours) is left alone
/// and reported. Busy mounts are detached.
pub fn unmount(dir: &Dir, rel: &Path, id: Option<u64>) -> io::Result<()> {
    let fd = dir.open_target(rel)?;
    let found = mount_id(fd.as_fd())?;
    let (parent, _) = split(rel)?;
    let parent_id = match parent {
        Some(p) => mount_id(dir.open_target(p)?.as_fd())?,
        None => mount_id(dir.as_fd())?,
    };
    if found == parent_id {
        return Err(io::Error::other(format!("{} is not a mount point (any more)", dir.path.join(rel).display())));
    }
    if let Some(id) = id {
        if found != id {
            return Err(io::Error::other(format!(
                "{} holds mount {found}, not the recorded mount {id}: left alone",
                dir.path.join(rel).display()
            )));
        }
    }
    // The magic link names exactly the mount root `fd` holds; nothing is resolved by name.
    let p = fd_path(fd.as_fd());
    match nix::mount::umount2(&p, nix::mount::MntFlags::empty()) {
        Ok(()) => Ok(()),
        // Expected when a container is deleted while its pod runs: the VMM's virtio-fs
        // still holds the inodes the guest has not forgotten yet. The detached mount goes
        // when those are released (at the latest with the VMM).
        Err(nix::errno::Errno::EBUSY) => {
            log::info!("unmounting {}: busy; detaching it lazily", dir.path.join(rel).display());
            nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| at("detaching", &dir.path.join(rel), e.into()))
        }
        Err(e) => Err(at("unmounting", &dir.path.join(rel), e.into())),
    }
}

/// Creates `path` and its missing ancestors with mode `mode` (only the created ones;
/// an existing directory keeps its mode).
pub fn create_dir_all_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(mode).create(path).map_err(|e| at("creating", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn tmp() -> (tempfile::TempDir, Dir) {
        let t = tempfile::tempdir().unwrap();
        let d = Dir::open_trusted(t.path()).unwrap();
        (t, d)
    }

    #[test]
    fn relative_paths_only() {
        let (_t, d) = tmp();
        for bad in ["", "/etc", "../x", "a/../../x", "./a"] {
            assert!(d.open_dir(Path::new(bad)).is_err(), "{bad:?} accepted");
            assert!(d.mkdir_all(Path::new(bad), 0o700).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn mkdir_all_sets_the_mode_and_refuses_symlinked_components() {
        let (t, d) = tmp();
        d.mkdir_all(Path::new("a/b/c"), 0o700).unwrap();
        let m = std::fs::metadata(t.path().join("a/b/c")).unwrap().permissions().mode();
        assert_eq!(m & 0o7777, 0o700);
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path(), t.path().join("evil")).unwrap();
        let e = d.mkdir_all(Path::new("evil/x"), 0o700).unwrap_err();
        assert!(e.to_string().contains("evil"), "{e}");
        assert!(!outside.path().join("x").exists(), "mkdir followed a symlink");
        // A symlink as an intermediate component of an existing path, too.
        std::fs::create_dir(t.path().join("p")).unwrap();
        symlink(outside.path(), t.path().join("p/q")).unwrap();
        assert!(d.mkdir_all(Path::new("p/q/r"), 0o700).is_err());
        assert!(!outside.path().join("r").exists(), "mkdir followed a nested symlink");
    }

    #[test]
    fn open_file_follows_no_symlink_and_rename_moves_single_names_only() {
        let (t, d) = tmp();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host").unwrap();
        symlink(outside.path().join("secret"), t.path().join("link")).unwrap();
        symlink(outside.path(), t.path().join("dirlink")).unwrap();
        for bad in ["link", "dirlink/secret", "../x", "/etc/passwd", ""] {
            assert!(d.open_file(Path::new(bad), libc::O_RDONLY, 0).is_err(), "{bad:?} opened");
        }
        let mut f = d.open_file(Path::new("new"), libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o600).unwrap();
        std::io::Write::write_all(&mut f, b"x").unwrap();
        assert_eq!(std::fs::metadata(t.path().join("new")).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::create_dir(t.path().join("sub")).unwrap();
        let sub = d.open_dir(Path::new("sub")).unwrap();
        d.rename("new", &sub, "moved", 0).unwrap();
        assert!(t.path().join("sub/moved").exists());
        for (a, b) in [("sub/moved", "x"), ("..", "x"), ("link", "../x"), ("", "x")] {
            assert!(d.rename(a, &d, b, 0).is_err(), "{a:?} -> {b:?} renamed");
        }
        // A symlink moves as itself, its target untouched.
        d.rename("link", &sub, "link", 0).unwrap();
        assert!(std::fs::symlink_metadata(t.path().join("sub/link")).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(outside.path().join("secret")).unwrap(), "host");
        std::fs::write(t.path().join("taken"), "").unwrap();
        let e = sub.rename("moved", &d, "taken", libc::RENAME_NOREPLACE).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    }

    #[test]
    fn create_file_refuses_an_existing_name_or_symlink() {
        let (t, d) = tmp();
        d.create_file(Path::new("f"), 0o600).unwrap();
        assert!(d.create_file(Path::new("f"), 0o600).is_err());
        let victim = t.path().join("victim");
        symlink(&victim, t.path().join("s")).unwrap();
        assert!(d.create_file(Path::new("s"), 0o600).is_err());
        assert!(!victim.exists(), "O_CREAT followed a dangling symlink");
        std::fs::create_dir(t.path().join("sub")).unwrap();
        d.create_file(Path::new("sub/g"), 0o600).unwrap();
        assert!(t.path().join("sub/g").is_file());
    }

    #[test]
    fn open_target_never_follows_a_symlink() {
        let (t, d) = tmp();
        let outside = tempfile::tempdir().unwrap();
        symlink(outside.path(), t.path().join("link")).unwrap();
        assert!(d.open_target(Path::new("link")).is_err());
        assert!(d.open_target(Path::new("link/x")).is_err());
        std::fs::create_dir(t.path().join("real")).unwrap();
        let fd = d.open_target(Path::new("real")).unwrap();
        let via = std::fs::read_link(fd_path(fd.as_fd())).unwrap();
        assert_eq!(via, t.path().join("real"));
    }

    #[test]
    fn remove_tree_removes_symlinks_as_names_and_keeps_their_targets() {
        let (t, d) = tmp();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), b"x").unwrap();
        std::fs::create_dir_all(t.path().join("c/rootfs/deep")).unwrap();
        std::fs::write(t.path().join("c/rootfs/deep/f"), b"y").unwrap();
        symlink(outside.path(), t.path().join("c/rootfs/link")).unwrap();
        symlink(outside.path().join("precious"), t.path().join("c/file-link")).unwrap();
        d.remove_tree(Path::new("c")).unwrap();
        assert!(!t.path().join("c").exists());
        assert!(outside.path().join("precious").is_file(), "a file behind a symlink was deleted");
        // The top name itself a symlink to a directory: the link goes, not the directory.
        symlink(outside.path(), t.path().join("top")).unwrap();
        d.remove_tree(Path::new("top")).unwrap();
        assert!(!t.path().join("top").exists() && outside.path().join("precious").is_file());
        // Missing is fine.
        d.remove_tree(Path::new("never-was")).unwrap();
        d.remove_tree(Path::new("never/was")).unwrap();
    }

    #[test]
    fn remove_tree_refuses_a_symlinked_parent() {
        let (t, d) = tmp();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("x")).unwrap();
        symlink(outside.path(), t.path().join("p")).unwrap();
        assert!(d.remove_tree(Path::new("p/x")).is_err());
        assert!(outside.path().join("x").is_dir());
    }

    /// Needs root (mounts): `make unit` runs it as root.
    #[test]
    #[ignore = "needs root (mounts a tmpfs)"]
    fn remove_tree_stops_at_a_mount_and_unmount_checks_the_recorded_id() {
        let (t, d) = tmp();
        std::fs::create_dir_all(t.path().join("c/rootfs")).unwrap();
        let target = d.open_target(Path::new("c/rootfs")).unwrap();
        mount_fs(Some("tmpfs"), target.as_fd(), "tmpfs", nix::mount::MsFlags::empty(), None).unwrap();
        std::fs::write(t.path().join("c/rootfs/on-the-mount"), b"z").unwrap();
        let e = d.remove_tree(Path::new("c")).unwrap_err();
        assert!(e.to_string().contains("mount point"), "{e}");
        assert!(t.path().join("c/rootfs/on-the-mount").is_file(), "a file on a mount was removed");
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info.lines().find(|l| l.contains(&format!("{}/c/rootfs ", t.path().display()))).unwrap();
        assert!(line.contains("nosuid") && line.contains("nodev"), "{line}");
        // Not the recorded id: refused, still mounted.
        assert!(unmount(&d, Path::new("c/rootfs"), Some(1)).is_err());
        assert!(t.path().join("c/rootfs/on-the-mount").is_file());
        let id = mount_id(d.open_target(Path::new("c/rootfs")).unwrap().as_fd()).unwrap();
        unmount(&d, Path::new("c/rootfs"), Some(id)).unwrap();
        assert!(!t.path().join("c/rootfs/on-the-mount").exists());
        assert!(unmount(&d, Path::new("c/rootfs"), None).is_err(), "unmounted a plain directory");
        d.remove_tree(Path::new("c")).unwrap();
    }

    /// Needs root (mounts).
    #[test]
    #[ignore = "needs root (bind mounts)"]
    fn binds_are_nosuid_nodev_and_read_only_all_the_way_down() {
        let (t, d) = tmp();
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("sub")).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &src.path().join("sub"),
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        std::fs::create_dir(t.path().join("v")).unwrap();
        let attrs = BindAttrs::all(GUARD | libc::MOUNT_ATTR_RDONLY);
        let id = bind(src.path(), d.open_target(Path::new("v")).unwrap().as_fd(), attrs, true).unwrap();
        let denied = |p: PathBuf| std::fs::write(&p, b"x").unwrap_err().raw_os_error();
        assert_eq!(denied(t.path().join("v/f")), Some(libc::EROFS));
        assert_eq!(
            denied(t.path().join("v/sub/f")),
            Some(libc::EROFS),
            "a submount of a read-only bind stayed writable"
        );
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        for l in info.lines().filter(|l| l.contains(&format!("{}/v", t.path().display()))) {
            let opts: Vec<&str> = l.split(' ').nth(5).unwrap().split(',').collect();
            assert!(["ro", "nosuid", "nodev"].iter().all(|o| opts.contains(o)), "{l}");
        }
        // The source is untouched and still writable.
        std::fs::write(src.path().join("sub/f"), b"x").unwrap();
        nix::mount::umount2(&t.path().join("v/sub"), nix::mount::MntFlags::MNT_DETACH).unwrap();
        unmount(&d, Path::new("v"), Some(id)).unwrap();
        nix::mount::umount2(&src.path().join("sub"), nix::mount::MntFlags::empty()).unwrap();
    }
}
