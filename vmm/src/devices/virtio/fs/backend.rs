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
//!   no DAX), per cache mode;
//! - caps on what the passthrough holds for the guest (`Holdings`): distinct inodes (an
//!   `O_PATH` descriptor each, held from LOOKUP until the last FORGET) and open handles
//!   (a descriptor each, from OPEN/OPENDIR/CREATE until RELEASE). A guest that looks up
//!   or opens without ever forgetting or releasing gets ENFILE at the cap instead of
//!   exhausting the VMM's descriptors.
//!
//! Operations not delegated here (locks, ioctl, bmap, poll, DAX mappings) get ENOSYS.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
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

/// What the passthrough holds for the guest, counted against the share's caps: the
/// lookup count of every inode the guest knows (mirroring the passthrough's own
/// reference counts: +1 per entry handed out, -N per FORGET of N, gone at 0), and the
/// number of open handles. The root inode is never counted: the passthrough holds it
/// for the whole session.
struct Holdings {
    tag: String,
    max_inodes: usize,
    max_handles: usize,
    held: Mutex<Held>,
    /// Whether each cap was hit already (logged once per share, not per request).
    inodes_hit: AtomicBool,
    handles_hit: AtomicBool,
}

#[derive(Default)]
struct Held {
    lookups: HashMap<u64, u64>,
    handles: usize,
}

/// The errno past a cap: ENFILE ("too many open files in the system"), the system here
/// being the share; EMFILE would wrongly blame the guest process's own limit.
fn cap_reached() -> io::Error {
    errno(libc::ENFILE)
}

impl Holdings {
    fn new(config: &SharedDirConfig) -> Self {
        Self {
            tag: config.tag.clone(),
            max_inodes: config.max_inodes as usize,
            max_handles: config.max_handles as usize,
            held: Mutex::new(Held::default()),
            inodes_hit: AtomicBool::new(false),
            handles_hit: AtomicBool::new(false),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuse(&self, hit: &AtomicBool, what: &str, cap: usize) -> io::Error {
        if !hit.swap(true, Ordering::Relaxed) {
            log::warn!(
                "virtio-fs share '{}': the guest holds {cap} {what}, the cap; further ones fail with ENFILE until it \
                 releases some (logged once)",
                self.tag
            );
        }
        cap_reached()
    }

    /// For operations that always make a new inode (CREATE, MKDIR, MKNOD, SYMLINK):
    /// refuse before anything is created on the host.
    fn inode_room(&self) -> io::Result<()> {
        if self.held().lookups.len() >= self.max_inodes {
            return Err(self.refuse(&self.inodes_hit, "inodes", self.max_inodes));
        }
        Ok(())
    }

    fn handle_room(&self) -> io::Result<()> {
        if self.held().handles >= self.max_handles {
            return Err(self.refuse(&self.handles_hit, "open handles", self.max_handles));
        }
        Ok(())
    }

    /// Counts one more lookup of `inode` if the guest holds it already or there is room
    /// for one more inode; false (nothing counted) when it would be one inode too many.
    fn admit(&self, inode: u64) -> bool {
        if inode == 0 || inode == ROOT_ID {
            return true;
        }
        let mut held = self.held();
        let at_cap = held.lookups.len() >= self.max_inodes;
        match held.lookups.get_mut(&inode) {
            Some(n) => *n = n.saturating_add(1),
            None if at_cap => return false,
            None => {
                held.lookups.insert(inode, 1);
            }
        }
        true
    }

    /// `entry`, just handed out by the passthrough (which took a reference for it),
    /// counted; past the inode cap the reference is given back and the request fails.
    fn entry(&self, inner: &PassthroughFs<()>, ctx: &Context, entry: Entry) -> io::Result<Entry> {
        if self.admit(entry.inode) {
            return Ok(entry);
        }
        inner.forget(ctx, entry.inode, 1);
        Err(self.refuse(&self.inodes_hit, "inodes", self.max_inodes))
    }

    fn forget(&self, inode: u64, count: u64) {
        if inode == ROOT_ID {
            return;
        }
        let mut held = self.held();
        if let Some(n) = held.lookups.get_mut(&inode) {
            *n = n.saturating_sub(count);
            if *n == 0 {
                held.lookups.remove(&inode);
            }
        }
    }

    fn opened(&self, handle: Option<u64>) {
        if handle.is_some() {
            self.held().handles += 1;
        }
    }

    fn released(&self) {
        let mut held = self.held();
        held.handles = held.handles.saturating_sub(1);
    }

    /// DESTROY: the passthrough dropped every inode and handle.
    fn clear(&self) {
        *self.held() = Held::default();
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let held = self.held();
        (held.lookups.len(), held.handles)
    }
}

/// `PassthroughFs` with wisp's guards (see the module documentation).
pub struct GuardedFs {
    inner: PassthroughFs<()>,
    read_only: bool,
    xattr: bool,
    cache: CacheMode,
    holdings: Holdings,
    /// Between FUSE INIT and DESTROY (or a device reset): the guest has the share
    /// mounted, and the inodes and handles it holds live here.
    session: AtomicBool,
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
        Ok(Self {
            inner,
            read_only: config.read_only,
            xattr: config.xattr,
            cache: config.cache,
            holdings: Holdings::new(config),
            session: AtomicBool::new(false),
        })
    }

    /// Whether the guest has a FUSE session (the share mounted) on this file system.
    pub fn session_live(&self) -> bool {
        self.session.load(Ordering::SeqCst)
    }

    /// (distinct inodes, open handles) held for the guest.
    #[cfg(test)]
    pub fn holdings(&self) -> (usize, usize) {
        self.holdings.counts()
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
        self.session.store(true, Ordering::SeqCst);
        Ok(want & !REFUSED_OPTIONS)
    }

    fn destroy(&self) {
        self.inner.destroy();
        self.holdings.clear();
        self.session.store(false, Ordering::SeqCst);
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        let bytes = name.to_bytes();
        if bytes.is_empty() {
            return Err(errno(libc::ENOENT));
        }
        if bytes.contains(&b'/') {
            return Err(errno(libc::EINVAL));
        }
        let name = if parent == ROOT_ID && bytes == b".." { c"." } else { name };
        let entry = self.inner.lookup(ctx, parent, name)?;
        self.holdings.entry(&self.inner, ctx, entry)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.holdings.forget(inode, count);
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        for &(inode, count) in &requests {
            self.holdings.forget(inode, count);
        }
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
        self.holdings.inode_room()?;
        let entry = self.inner.symlink(ctx, linkname, parent, name)?;
        self.holdings.entry(&self.inner, ctx, entry)
    }

    fn mknod(&self, ctx: &Context, parent: u64, name: &CStr, mode: u32, rdev: u32, umask: u32) -> io::Result<Entry> {
        self.writable()?;
        if matches!(mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFBLK) {
            return Err(errno(libc::EPERM));
        }
        self.holdings.inode_room()?;
        let entry = self.inner.mknod(ctx, parent, name, mode, rdev, umask)?;
        self.holdings.entry(&self.inner, ctx, entry)
    }

    fn mkdir(&self, ctx: &Context, parent: u64, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry> {
        self.writable()?;
        self.holdings.inode_room()?;
        let entry = self.inner.mkdir(ctx, parent, name, mode, umask)?;
        self.holdings.entry(&self.inner, ctx, entry)
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
        // The guest holds `inode` already: a new reference, not a new inode.
        let entry = self.inner.link(ctx, inode, newparent, newname)?;
        self.holdings.entry(&self.inner, ctx, entry)
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
        self.holdings.handle_room()?;
        let opened = self.inner.open(ctx, inode, flags, fuse_flags)?;
        self.holdings.opened(opened.0);
        Ok(opened)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.writable()?;
        self.holdings.inode_room()?;
        self.holdings.handle_room()?;
        let (entry, handle, opts, passthrough) = self.inner.create(ctx, parent, name, args)?;
        let entry = match self.holdings.entry(&self.inner, ctx, entry) {
            Ok(entry) => entry,
            Err(e) => {
                if let Some(h) = handle {
                    let _ = self.inner.release(ctx, entry.inode, 0, h, false, false, None);
                }
                return Err(e);
            }
        };
        self.holdings.opened(handle);
        Ok((entry, handle, opts, passthrough))
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
        self.inner.release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        self.holdings.released();
        Ok(())
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
        self.holdings.handle_room()?;
        let opened = self.inner.opendir(ctx, inode, flags)?;
        self.holdings.opened(opened.0);
        Ok(opened)
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
        // The passthrough looks up every name it lists (a reference each); it gives the
        // reference back itself when the reply is full (Ok(0)), not on an error.
        self.inner.readdirplus(ctx, inode, handle, size, offset, &mut |dir_entry, entry| {
            if self.holdings.admit(entry.inode) {
                let added = add_entry(dir_entry, entry);
                match added {
                    Ok(0) => self.holdings.forget(entry.inode, 1),
                    Ok(_) => {}
                    Err(_) => {
                        self.holdings.forget(entry.inode, 1);
                        self.inner.forget(ctx, entry.inode, 1);
                    }
                }
                return added;
            }
            // Past the inode cap: the name is listed without an inode (node id 0, which
            // the guest kernel takes as "no attributes for this one"; a later LOOKUP of
            // it gets ENFILE), and the reference is given back at once.
            self.inner.forget(ctx, entry.inode, 1);
            let _ = self.holdings.refuse(&self.holdings.inodes_hit, "inodes", self.holdings.max_inodes);
            let nameless = Entry { inode: 0, attr_timeout: Duration::ZERO, entry_timeout: Duration::ZERO, ..entry };
            add_entry(dir_entry, nameless)
        })
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)?;
        self.holdings.released();
        Ok(())
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

/// Descriptors the VMM needs besides what its shares hold for the guest: KVM, the VM and
/// vCPU fds, queue eventfds and irqfds, taps, disk images, the console, the control
/// API, and up to 1024 vsock connections (`vsock::MAX_CONNECTIONS`) with their host
/// streams and listeners.
pub const FD_MARGIN: u64 = 4096;

/// Descriptors wanted so far: the margin plus, per share, its inode and handle caps.
static FDS_WANTED: AtomicU64 = AtomicU64::new(FD_MARGIN);

/// Raises this process's soft limit on open files to what the shares' caps need: the
/// passthrough keeps one descriptor per inode the guest holds and one per open handle,
/// and a container root file system easily has more files than the usual 1024. Called
/// once per share with its `max_inodes + max_handles`; the limit grows to the margin
/// plus every share's caps, never past the hard limit and never down. Not simply the
/// hard limit: that is often 2^20 or more, and would let a VMM bug or a share whose
/// caps are set too high pin that many host files.
pub fn raise_open_file_limit(share_caps: u64) {
    let wanted = FDS_WANTED.fetch_add(share_caps, Ordering::Relaxed).saturating_add(share_caps);
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into `limit`, a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        log::warn!("virtio-fs: cannot read the open file limit: {}", io::Error::last_os_error());
        return;
    }
    if limit.rlim_max < wanted {
        log::warn!(
            "virtio-fs: the shares' caps need {wanted} open files but the hard limit is {}; the guest may get \
             EMFILE before it reaches a cap",
            limit.rlim_max
        );
    }
    let Some(soft) = soft_limit_for(limit.rlim_cur, limit.rlim_max, wanted) else { return };
    let raised = libc::rlimit { rlim_cur: soft, rlim_max: limit.rlim_max };
    // SAFETY: setrlimit only reads `raised`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        log::warn!(
            "virtio-fs: cannot raise the open file limit from {} to {soft}: {}",
            limit.rlim_cur,
            io::Error::last_os_error()
        );
    } else {
        log::debug!("virtio-fs: open file limit raised from {} to {soft}", limit.rlim_cur);
    }
}

/// The soft limit for `wanted` descriptors given the current soft and hard limits:
/// `wanted` capped by the hard limit, or `None` when the current one is enough.
fn soft_limit_for(current: u64, hard: u64, wanted: u64) -> Option<u64> {
    let target = wanted.min(hard);
    (target > current).then_some(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_covers_the_caps_and_stays_under_the_hard_limit() {
        // The usual 1024 soft limit, a 2^20 hard limit: raised to what is wanted only.
        assert_eq!(soft_limit_for(1024, 1 << 20, 300_000), Some(300_000));
        // A low hard limit caps it.
        assert_eq!(soft_limit_for(1024, 4096, 300_000), Some(4096));
        // Unlimited hard limit (RLIM_INFINITY): still only what is wanted.
        assert_eq!(soft_limit_for(1024, libc::RLIM_INFINITY, 300_000), Some(300_000));
        // Never lowered.
        assert_eq!(soft_limit_for(500_000, 1 << 20, 300_000), None);
        assert_eq!(soft_limit_for(300_000, 1 << 20, 300_000), None);
        // The default caps fit under systemd's default hard limit for services.
        let default = FD_MARGIN + u64::from(super::super::DEFAULT_MAX_INODES + super::super::DEFAULT_MAX_HANDLES);
        assert!(default < 524_288, "{default}");
    }
}
