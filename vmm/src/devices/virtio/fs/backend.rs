//! The host side of a share: fuse-backend-rs's `PassthroughFs` rooted at the shared
//! directory, behind `GuardedFs`, which adds what the passthrough does not enforce.
//!
//! What the passthrough already guarantees (checked against fuse-backend-rs 0.14): every
//! name is resolved with `openat(parent_fd, name, O_PATH | O_NOFOLLOW)` relative to the
//! parent's file descriptor, so the server never follows a symlink itself; LOOKUP refuses
//! names containing `/`; creating operations refuse `.`, `..` and names with `/`; only
//! regular files and directories are ever opened for I/O (a symlink, device node, FIFO or
//! socket inode gets EBADF on OPEN); `..` looked up on the root inode is the root itself.
//!
//! What `GuardedFs` adds:
//! - read-only shares: the passthrough has no read-only mode, so every operation that
//!   changes the tree or a file (including OPEN for writing or with O_TRUNC, and ACCESS
//!   for W_OK) fails with EROFS here, before the passthrough sees it;
//! - no device nodes: MKNOD of a character or block device fails with EPERM (FIFOs and
//!   sockets are allowed: the guest kernel serves them itself, the host never opens them);
//! - LOOKUP guards that do not depend on the library's internals: `..` on the root stays
//!   at the root, empty names and names with `/` are refused;
//! - extended attributes only when enabled, and then only on regular files and
//!   directories (the passthrough reaches xattrs through `/proc/self/fd` paths);
//! - the FUSE INIT options wisp wants (1 MiB requests, async reads, no writeback cache,
//!   no DAX), per cache mode.
//!
//! Operations not delegated here (locks, ioctl, bmap, poll, DAX mappings) get ENOSYS.

use std::ffi::CStr;
use std::io;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn, ROOT_ID};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileSystem, FsOptions, GetxattrReply, ListxattrReply, OpenOptions, SetattrValid,
    ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::{Config, PassthroughFs};

use super::config::{CacheMode, SharedDirConfig};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("virtio-fs share '{tag}': {path} cannot be served: the path is not valid UTF-8")]
    PathNotUtf8 { tag: String, path: String },
    #[error("virtio-fs share '{tag}': cannot resolve {path}: {source}")]
    Canonicalize { tag: String, path: String, source: io::Error },
    #[error("virtio-fs share '{tag}': cannot set up the passthrough file system: {source}")]
    Passthrough { tag: String, source: io::Error },
}

/// FUSE INIT options wisp asks for on top of the passthrough's own: requests of up to
/// 1 MiB (MAX_PAGES; BIG_WRITES for older guests), several reads in flight per file,
/// parallel lookups in one directory, O_TRUNC handled in OPEN.
const WANTED_OPTIONS: FsOptions = FsOptions::from_bits_truncate(
    FsOptions::ASYNC_READ.bits()
        | FsOptions::BIG_WRITES.bits()
        | FsOptions::MAX_PAGES.bits()
        | FsOptions::PARALLEL_DIROPS.bits()
        | FsOptions::ATOMIC_O_TRUNC.bits(),
);
/// Options never granted: writeback caching (the host changes the tree behind the guest),
/// DAX (no shared memory window), no-open modes (the passthrough keeps a handle per open).
const REFUSED_OPTIONS: FsOptions = FsOptions::from_bits_truncate(
    FsOptions::WRITEBACK_CACHE.bits()
        | FsOptions::PERFILE_DAX.bits()
        | FsOptions::ZERO_MESSAGE_OPEN.bits()
        | FsOptions::ZERO_MESSAGE_OPENDIR.bits(),
);

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// `PassthroughFs` with wisp's guards (see the module documentation).
pub struct GuardedFs {
    inner: PassthroughFs<()>,
    read_only: bool,
    xattr: bool,
    cache: CacheMode,
}

impl GuardedFs {
    /// A passthrough rooted at the canonical form of `config.path` (so a symlinked share
    /// path is resolved once, here, and not followed again). The root is opened when the
    /// guest sends FUSE INIT.
    pub fn new(config: &SharedDirConfig) -> Result<Self, BackendError> {
        let tag = config.tag.clone();
        let shown = config.path.display().to_string();
        let root = std::fs::canonicalize(&config.path).map_err(|source| BackendError::Canonicalize {
            tag: tag.clone(),
            path: shown.clone(),
            source,
        })?;
        let root_dir = root.to_str().ok_or_else(|| BackendError::PathNotUtf8 { tag: tag.clone(), path: shown })?;
        let timeout = config.cache.timeout();
        let passthrough = Config {
            root_dir: root_dir.to_string(),
            cache_policy: config.cache.policy(),
            attr_timeout: timeout,
            entry_timeout: timeout,
            xattr: config.xattr,
            writeback: false,
            do_import: true,
            no_open: false,
            no_opendir: false,
            killpriv_v2: false,
            inode_file_handles: false,
            ..Config::default()
        };
        let inner = PassthroughFs::new(passthrough).map_err(|source| BackendError::Passthrough { tag, source })?;
        Ok(Self { inner, read_only: config.read_only, xattr: config.xattr, cache: config.cache })
    }

    fn writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(erofs())
        } else {
            Ok(())
        }
    }

    /// Extended attributes: off (ENOSYS, which the guest remembers), or only on regular
    /// files and directories.
    fn xattr_allowed(&self, ctx: &Context, inode: u64) -> io::Result<()> {
        if !self.xattr {
            return Err(errno(libc::ENOSYS));
        }
        let (st, _) = self.inner.getattr(ctx, inode, None)?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFDIR => Ok(()),
            _ => Err(errno(libc::EOPNOTSUPP)),
        }
    }
}

impl FileSystem for GuardedFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut want = self.inner.init(capable)? | WANTED_OPTIONS;
        match self.cache {
            // Refresh attributes on reads and drop cached data whose size or mtime changed.
            CacheMode::Auto => want |= FsOptions::AUTO_INVAL_DATA,
            CacheMode::Always => want |= FsOptions::CACHE_SYMLINKS,
            CacheMode::Never => {}
        }
        Ok(want & !REFUSED_OPTIONS)
    }

    fn destroy(&self) {
        self.inner.destroy()
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let bytes = name.to_bytes();
        if bytes.is_empty() {
            return Err(errno(libc::ENOENT));
        }
        if bytes.contains(&b'/') {
            return Err(errno(libc::EINVAL));
        }
        if parent == ROOT_ID && bytes == b".." {
            return self.inner.lookup(ctx, parent, c".");
        }
        self.inner.lookup(ctx, parent, name)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(&self, ctx: &Context, inode: u64, handle: Option<u64>) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.writable()?;
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(&self, ctx: &Context, linkname: &CStr, parent: u64, name: &CStr) -> io::Result<Entry> {
        self.writable()?;
        self.inner.symlink(ctx, linkname, parent, name)
    }

    fn mknod(&self, ctx: &Context, parent: u64, name: &CStr, mode: u32, rdev: u32, umask: u32) -> io::Result<Entry> {
        self.writable()?;
        if matches!(mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK) {
            return Err(errno(libc::EPERM));
        }
        self.inner.mknod(ctx, parent, name, mode, rdev, umask)
    }

    fn mkdir(&self, ctx: &Context, parent: u64, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry> {
        self.writable()?;
        self.inner.mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.writable()?;
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.writable()?;
        self.inner.rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.writable()?;
        self.inner.link(ctx, inode, newparent, newname)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        let flags_i = flags as i32;
        if self.read_only && (flags_i & libc::O_ACCMODE != libc::O_RDONLY || flags_i & libc::O_TRUNC != 0) {
            return Err(erofs());
        }
        self.inner.open(ctx, inode, flags, fuse_flags)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.writable()?;
        self.inner.create(ctx, parent, name, args)
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        flags: u32,
    ) -> io::Result<usize> {
        self.inner.read(ctx, inode, handle, w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.writable()?;
        self.inner.write(ctx, inode, handle, r, size, offset, lock_owner, delayed_write, flags, fuse_flags)
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(&self, ctx: &Context, inode: u64, handle: u64, mode: u32, offset: u64, length: u64) -> io::Result<()> {
        self.writable()?;
        self.inner.fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.inner.release(ctx, inode, flags, handle, flush, flock_release, lock_owner)
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(&self, ctx: &Context, inode: u64, name: &CStr, value: &[u8], flags: u32) -> io::Result<()> {
        self.xattr_allowed(ctx, inode)?;
        self.writable()?;
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(&self, ctx: &Context, inode: u64, name: &CStr, size: u32) -> io::Result<GetxattrReply> {
        self.xattr_allowed(ctx, inode)?;
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.xattr_allowed(ctx, inode)?;
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.xattr_allowed(ctx, inode)?;
        self.writable()?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(&self, ctx: &Context, inode: u64, flags: u32) -> io::Result<(Option<u64>, OpenOptions)> {
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner.readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner.readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if self.read_only && mask as i32 & libc::W_OK != 0 {
            return Err(erofs());
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(&self, ctx: &Context, inode: u64, handle: u64, offset: u64, whence: u32) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }
}

/// Raises this process's soft limit on open files to the hard limit: the passthrough
/// keeps one `O_PATH` descriptor per inode the guest has looked up (until it forgets
/// it), and a container root file system easily has more files than the usual 1024.
pub fn raise_open_file_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into `limit`, a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        log::warn!("virtio-fs: cannot read the open file limit: {}", io::Error::last_os_error());
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        return;
    }
    let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit only reads `raised`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        log::warn!(
            "virtio-fs: cannot raise the open file limit from {} to {}: {}",
            limit.rlim_cur,
            limit.rlim_max,
            io::Error::last_os_error()
        );
    } else {
        log::debug!("virtio-fs: open file limit raised from {} to {}", limit.rlim_cur, limit.rlim_max);
    }
}
