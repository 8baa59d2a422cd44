//! virtio-fs through its queues: a `FuseDriver` sends the FUSE requests the guest kernel
//! would (and malformed ones it would not) to a real `SharedDir` serving a tempdir.

use std::ffi::CStr;
use std::os::unix::fs::{symlink, FileTypeExt, MetadataExt, PermissionsExt};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, BatchForgetIn, InHeader, Opcode, OutHeader, ReadIn, SetattrIn, KERNEL_VERSION, ROOT_ID,
};
use fuse_backend_rs::api::filesystem::{Context, Entry, FileSystem, FsOptions, OpenOptions};
use fuse_backend_rs::api::server::Server;
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::test_utils::{cstr, FuseDriver, GuestRing, READ, REPLY, REQ, REQUEST_QUEUE, WRITE};
use super::*;
use crate::devices::virtio::test_utils::{guest_memory, RecordingInterrupt, MEM_SIZE};
use crate::devices::virtio::{ActivateError, InterruptKind, QueueT, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1};

const EROFS: i32 = libc::EROFS;
/// SETATTR `valid` bits (FATTR_MODE, FATTR_SIZE in the FUSE ABI).
const FATTR_MODE: u32 = 1 << 0;
const FATTR_SIZE: u32 = 1 << 3;

/// A tempdir share holding `hello.txt`, `sub/inner.txt`.
fn share() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), b"hello from the host\n").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub/inner.txt"), b"inner").unwrap();
    dir
}

fn config(dir: &tempfile::TempDir) -> SharedDirConfig {
    SharedDirConfig::new("wisp-test", dir.path())
}

#[test]
fn config_space_holds_the_tag_and_the_request_queue_count() {
    let dir = share();
    let mut cfg = config(&dir);
    cfg.request_queues = 3;
    let dev = SharedDir::new(&cfg).unwrap();
    assert_eq!(dev.device_type(), TYPE_FS);
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
    let mut space = [0xffu8; 40];
    dev.read_config(0, &mut space);
    let mut want = b"wisp-test".to_vec();
    want.resize(TAG_MAX_LEN, 0);
    want.extend_from_slice(&3u32.to_le_bytes());
    assert_eq!(space.to_vec(), want);
    // Any width and offset; bytes past the end read as zero.
    let mut word = [0u8; 4];
    dev.read_config(36, &mut word);
    assert_eq!(u32::from_le_bytes(word), 3);
    dev.read_config(38, &mut word);
    assert_eq!(word, [0; 4]);
    dev.read_config(u64::MAX, &mut word);
    assert_eq!(word, [0; 4]);

    let mut cfg = config(&dir);
    cfg.tag = "t".repeat(TAG_MAX_LEN);
    let dev = SharedDir::new(&cfg).unwrap();
    dev.read_config(0, &mut space);
    assert_eq!(&space[..TAG_MAX_LEN], "t".repeat(TAG_MAX_LEN).as_bytes(), "a full-length tag has no NUL");
    assert_eq!(&space[TAG_MAX_LEN..], &1u32.to_le_bytes(), "one request queue by default");
}

#[test]
fn bad_configurations_are_refused() {
    let dir = share();
    let mut cfg = config(&dir);
    cfg.tag = String::new();
    assert!(matches!(SharedDir::new(&cfg), Err(FsError::Config(ConfigError::EmptyTag))));
    let mut cfg = config(&dir);
    cfg.path = dir.path().join("hello.txt");
    assert!(matches!(SharedDir::new(&cfg), Err(FsError::Config(ConfigError::NotADirectory { .. }))));
}

#[test]
fn activation_takes_hiprio_plus_one_to_n_request_queues() {
    let dir = share();
    let mut cfg = config(&dir);
    cfg.request_queues = 2;
    let mut dev = SharedDir::new(&cfg).unwrap();
    assert_eq!(dev.queue_max_sizes(), &[HIPRIO_QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(dev.queue_events().len(), 3);
    let mem = guest_memory();
    let rings: Vec<GuestRing> = (0..4).map(|i| GuestRing::new(&mem, 0x4000 * i, 16)).collect();
    let queues = |n: usize| rings[..n].iter().map(GuestRing::queue).collect::<Vec<_>>();
    for bad in [0, 1, 4] {
        let err = dev.activate(mem.clone(), RecordingInterrupt::new(), queues(bad)).unwrap_err();
        assert!(matches!(err, ActivateError::QueueCount { got, want: 3 } if got == bad), "{bad} queues");
        assert!(!dev.is_activated());
    }
    // A guest with one vCPU uses one request queue of the two offered.
    dev.activate(mem.clone(), RecordingInterrupt::new(), queues(2)).unwrap();
    assert!(dev.is_activated());
    assert!(dev.activate(mem.clone(), RecordingInterrupt::new(), queues(2)).is_err(), "already active");
    // A kick on the queue the driver did not set up is drained and ignored.
    dev.queue_events()[2].write(1).unwrap();
    dev.handle_queue_event(2);
    assert!(dev.reset());
    assert!(!dev.is_activated());
    dev.activate(mem, RecordingInterrupt::new(), queues(3)).unwrap();
}

#[test]
fn init_lookup_open_read_through_the_queue() {
    let dir = share();
    let mut d = FuseDriver::new(&config(&dir));
    let init = d.init().unwrap();
    assert_eq!(init.major, KERNEL_VERSION);
    let flags = FsOptions::from_bits_truncate(u64::from(init.flags));
    assert!(flags.contains(FsOptions::MAX_PAGES | FsOptions::BIG_WRITES | FsOptions::ASYNC_READ));
    assert!(flags.contains(FsOptions::AUTO_INVAL_DATA), "cache=auto refreshes cached data");
    assert!(!flags.contains(FsOptions::WRITEBACK_CACHE), "offered by the driver but refused");
    assert_eq!((init.max_pages, init.max_write), (256, 1 << 20));
    assert_eq!(d.irq.take(), vec![InterruptKind::Queue]);

    let root = d.root_attr();
    assert_eq!(root.attr.ino, std::fs::metadata(dir.path()).unwrap().ino());
    let entry = d.lookup(ROOT_ID, "hello.txt").unwrap();
    assert_eq!(entry.attr.size, 20);
    assert_eq!(entry.attr.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!((entry.entry_valid, entry.attr_valid), (1, 1), "cache=auto trusts entries for a second");
    let file = d.open(entry.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(file.open_flags, 0, "cache=auto: neither direct I/O nor keep-cache");
    assert_eq!(d.read(entry.nodeid, file.fh, 0, 4096).unwrap(), b"hello from the host\n");
    assert_eq!(d.read(entry.nodeid, file.fh, 11, 4).unwrap(), b"the ");
    assert_eq!(d.read(entry.nodeid, file.fh, 100, 4).unwrap(), b"");
    d.release(entry.nodeid, file.fh).unwrap();
    assert_eq!(d.read(entry.nodeid, file.fh, 0, 4), Err(libc::EBADF), "released handle");

    let sub = d.lookup(ROOT_ID, "sub").unwrap();
    let inner = d.lookup(sub.nodeid, "inner.txt").unwrap();
    let file = d.open(inner.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(d.read(inner.nodeid, file.fh, 0, 100).unwrap(), b"inner");
    assert_eq!(d.lookup(ROOT_ID, "missing").map(|_| ()), Err(libc::ENOENT));
    let mut getxattr = [0u8; 8].to_vec();
    getxattr.extend_from_slice(&cstr("user.wisp"));
    assert_eq!(d.call(Opcode::Getxattr, ROOT_ID, &getxattr), Err(libc::ENOSYS), "xattr is off by default");
}

#[test]
fn a_1_mib_read_fills_the_reply() {
    let dir = share();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.path().join("big"), &data).unwrap();
    let mut d = FuseDriver::mounted(&config(&dir));
    let entry = d.lookup(ROOT_ID, "big").unwrap();
    let file = d.open(entry.nodeid, libc::O_RDONLY).unwrap();
    assert!(d.read(entry.nodeid, file.fh, 0, 1 << 20).unwrap() == data);
}

#[test]
fn cache_modes_set_timeouts_and_open_flags() {
    let dir = share();
    for (mode, timeout, open_flags) in [
        (CacheMode::Never, 0, OpenOptions::DIRECT_IO),
        (CacheMode::Auto, 1, OpenOptions::empty()),
        (CacheMode::Always, 86_400, OpenOptions::KEEP_CACHE),
    ] {
        let mut cfg = config(&dir);
        cfg.cache = mode;
        let mut d = FuseDriver::mounted(&cfg);
        let entry = d.lookup(ROOT_ID, "hello.txt").unwrap();
        assert_eq!((entry.entry_valid, entry.attr_valid), (timeout, timeout), "{mode}");
        let file = d.open(entry.nodeid, libc::O_RDONLY).unwrap();
        assert_eq!(file.open_flags, open_flags.bits(), "{mode}");
    }
}

#[test]
fn writes_reach_the_host() {
    let dir = share();
    let mut d = FuseDriver::mounted(&config(&dir));
    let (entry, file) = d.create(ROOT_ID, "new.txt", libc::O_WRONLY, libc::S_IFREG | 0o640).unwrap();
    assert_eq!(d.write(entry.nodeid, file.fh, 0, b"written by the guest").unwrap(), 20);
    assert_eq!(d.write(entry.nodeid, file.fh, 8, b"BY").unwrap(), 2);
    d.release(entry.nodeid, file.fh).unwrap();
    assert_eq!(std::fs::read(dir.path().join("new.txt")).unwrap(), b"written BY the guest");
    assert_eq!(std::fs::metadata(dir.path().join("new.txt")).unwrap().permissions().mode() & 0o777, 0o640);

    let made = d.mkdir(ROOT_ID, "made", 0o755).unwrap();
    assert!(dir.path().join("made").is_dir());
    let truncate = SetattrIn { valid: FATTR_SIZE, size: 5, ..Default::default() };
    let attr = d.setattr(entry.nodeid, truncate).unwrap();
    assert_eq!(attr.attr.size, 5);
    assert_eq!(std::fs::read(dir.path().join("new.txt")).unwrap(), b"writt");
    d.unlink(ROOT_ID, "new.txt").unwrap();
    assert!(!dir.path().join("new.txt").exists());
    assert_eq!(d.lookup(made.nodeid, "..").unwrap().nodeid, ROOT_ID);
}

#[test]
fn read_only_share_refuses_every_change() {
    let dir = share();
    let mut cfg = config(&dir);
    cfg.read_only = true;
    let mut d = FuseDriver::mounted(&cfg);
    let hello = d.lookup(ROOT_ID, "hello.txt").unwrap();
    let sub = d.lookup(ROOT_ID, "sub").unwrap();

    assert_eq!(d.create(ROOT_ID, "new", libc::O_WRONLY, libc::S_IFREG | 0o644).map(|_| ()), Err(EROFS));
    assert_eq!(d.mkdir(ROOT_ID, "newdir", 0o755).map(|_| ()), Err(EROFS));
    assert_eq!(d.mknod(ROOT_ID, "fifo", libc::S_IFIFO | 0o644, 0).map(|_| ()), Err(EROFS));
    assert_eq!(d.unlink(ROOT_ID, "hello.txt"), Err(EROFS));
    assert_eq!(d.call(Opcode::Rmdir, ROOT_ID, &cstr("sub")), Err(EROFS));
    let mode = SetattrIn { valid: FATTR_MODE, mode: libc::S_IFREG | 0o777, ..Default::default() };
    assert_eq!(d.setattr(hello.nodeid, mode).map(|_| ()), Err(EROFS));
    let size = SetattrIn { valid: FATTR_SIZE, size: 0, ..Default::default() };
    assert_eq!(d.setattr(hello.nodeid, size).map(|_| ()), Err(EROFS));
    let mut symlink_args = cstr("link");
    symlink_args.extend_from_slice(&cstr("hello.txt"));
    assert_eq!(d.call(Opcode::Symlink, ROOT_ID, &symlink_args), Err(EROFS));
    let mut rename_args = ROOT_ID.to_le_bytes().to_vec();
    rename_args.extend_from_slice(&cstr("hello.txt"));
    rename_args.extend_from_slice(&cstr("renamed"));
    assert_eq!(d.call(Opcode::Rename, ROOT_ID, &rename_args), Err(EROFS));
    let mut link_args = hello.nodeid.to_le_bytes().to_vec();
    link_args.extend_from_slice(&cstr("hardlink"));
    assert_eq!(d.call(Opcode::Link, sub.nodeid, &link_args), Err(EROFS));
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(d.open(hello.nodeid, flags).map(|_| ()), Err(EROFS), "open flags {flags:#x}");
    }
    assert_eq!(d.call(Opcode::Access, hello.nodeid, &(libc::W_OK as u64).to_le_bytes()), Err(EROFS));
    // WRITE and FALLOCATE on a handle opened for reading.
    let file = d.open(hello.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(d.write(hello.nodeid, file.fh, 0, b"overwrite"), Err(EROFS));
    let mut falloc = file.fh.to_le_bytes().to_vec();
    falloc.extend_from_slice(&[0; 24]);
    assert_eq!(d.call(Opcode::Fallocate, hello.nodeid, &falloc), Err(EROFS));

    // Reading still works and the host tree is unchanged.
    assert_eq!(d.read(hello.nodeid, file.fh, 0, 5).unwrap(), b"hello");
    assert_eq!(std::fs::read(dir.path().join("hello.txt")).unwrap(), b"hello from the host\n");
    let mut names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["hello.txt", "sub"]);
}

#[test]
fn dotdot_on_the_root_stays_at_the_root() {
    let dir = share();
    let mut d = FuseDriver::mounted(&config(&dir));
    let root_ino = std::fs::metadata(dir.path()).unwrap().ino();
    let parent_ino = std::fs::metadata(dir.path().parent().unwrap()).unwrap().ino();
    assert_ne!(root_ino, parent_ino);
    for _ in 0..2 {
        let up = d.lookup(ROOT_ID, "..").unwrap();
        assert_eq!(up.nodeid, ROOT_ID, "'..' of the root is the root inode");
        assert_eq!(up.attr.ino, root_ino, "not the host parent");
    }
    assert_eq!(d.lookup(ROOT_ID, ".").unwrap().nodeid, ROOT_ID);
    let sub = d.lookup(ROOT_ID, "sub").unwrap();
    let up = d.lookup(sub.nodeid, "..").unwrap();
    assert_eq!(up.nodeid, ROOT_ID);
    assert_eq!(d.lookup(up.nodeid, "..").unwrap().nodeid, ROOT_ID);
    // Names with '/' never walk anywhere, and nothing can be created as '..'.
    assert_eq!(d.lookup(ROOT_ID, "../etc").map(|_| ()), Err(libc::EINVAL));
    assert_eq!(d.lookup(sub.nodeid, "../../etc").map(|_| ()), Err(libc::EINVAL));
    assert_eq!(d.lookup(ROOT_ID, "").map(|_| ()), Err(libc::ENOENT));
    assert_eq!(d.mkdir(ROOT_ID, "..", 0o755).map(|_| ()), Err(libc::EINVAL));
    assert_eq!(d.mkdir(ROOT_ID, "a/b", 0o755).map(|_| ()), Err(libc::EINVAL));
    let mut rename_args = ROOT_ID.to_le_bytes().to_vec();
    rename_args.extend_from_slice(&cstr("hello.txt"));
    rename_args.extend_from_slice(&cstr("../escaped"));
    assert_eq!(d.call(Opcode::Rename, ROOT_ID, &rename_args), Err(libc::EINVAL));
    assert!(!dir.path().parent().unwrap().join("escaped").exists());
}

#[test]
fn symlinks_out_of_the_share_are_never_followed_by_the_server() {
    let dir = share();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret");
    std::fs::write(&secret, b"host secret").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    symlink("/etc/shadow", dir.path().join("evil")).unwrap();
    symlink(&secret, dir.path().join("evil2")).unwrap();
    symlink(outside.path(), dir.path().join("outdir")).unwrap();
    symlink("../../..", dir.path().join("sub/up")).unwrap();
    let mut d = FuseDriver::mounted(&config(&dir));

    let evil = d.lookup(ROOT_ID, "evil").unwrap();
    assert_eq!(evil.attr.mode & libc::S_IFMT, libc::S_IFLNK, "LOOKUP describes the link, not its target");
    assert_eq!(evil.attr.size, "/etc/shadow".len() as u64);
    assert_eq!(d.readlink(evil.nodeid).unwrap(), b"/etc/shadow", "the guest gets the text and resolves it itself");
    let refused = d.open(evil.nodeid, libc::O_RDONLY).map(|_| ());
    assert!(matches!(refused, Err(libc::EBADF) | Err(libc::ELOOP)), "OPEN of a symlink inode: {refused:?}");
    assert_eq!(d.getattr(evil.nodeid).unwrap().attr.mode & libc::S_IFMT, libc::S_IFLNK);

    let evil2 = d.lookup(ROOT_ID, "evil2").unwrap();
    assert!(d.open(evil2.nodeid, libc::O_RDONLY).is_err());
    let chmod = SetattrIn { valid: FATTR_MODE, mode: libc::S_IFREG | 0o666, ..Default::default() };
    let _ = d.setattr(evil2.nodeid, chmod);
    let truncate = SetattrIn { valid: FATTR_SIZE, size: 0, ..Default::default() };
    assert!(d.setattr(evil2.nodeid, truncate).is_err());
    assert_eq!(std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777, 0o600, "target mode unchanged");
    assert_eq!(std::fs::read(&secret).unwrap(), b"host secret", "target content unchanged");

    // A link to a directory outside is not a directory to the server.
    let outdir = d.lookup(ROOT_ID, "outdir").unwrap();
    assert_eq!(d.lookup(outdir.nodeid, "secret").map(|_| ()), Err(libc::ENOTDIR));
    assert_eq!(d.call(Opcode::Opendir, outdir.nodeid, &[0; 8]).map(|_| ()), Err(libc::EBADF));
    let sub = d.lookup(ROOT_ID, "sub").unwrap();
    let up = d.lookup(sub.nodeid, "up").unwrap();
    assert_eq!(up.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert_eq!(d.lookup(up.nodeid, "etc").map(|_| ()), Err(libc::ENOTDIR));
    // A hard link made from the guest links the symlink itself, never its target.
    let mut link_args = evil2.nodeid.to_le_bytes().to_vec();
    link_args.extend_from_slice(&cstr("evil3"));
    let _ = d.call(Opcode::Link, ROOT_ID, &link_args);
    if let Ok(meta) = std::fs::symlink_metadata(dir.path().join("evil3")) {
        assert!(meta.file_type().is_symlink());
    }
}

#[test]
fn device_nodes_cannot_be_created_but_fifos_can() {
    let dir = share();
    let mut d = FuseDriver::mounted(&config(&dir));
    let null = libc::makedev(1, 3) as u32;
    assert_eq!(d.mknod(ROOT_ID, "null", libc::S_IFCHR | 0o666, null).map(|_| ()), Err(libc::EPERM));
    assert_eq!(
        d.mknod(ROOT_ID, "sda", libc::S_IFBLK | 0o666, libc::makedev(8, 0) as u32).map(|_| ()),
        Err(libc::EPERM)
    );
    assert!(!dir.path().join("null").exists() && !dir.path().join("sda").exists());
    let fifo = d.mknod(ROOT_ID, "fifo", libc::S_IFIFO | 0o644, 0).unwrap();
    assert!(std::fs::metadata(dir.path().join("fifo")).unwrap().file_type().is_fifo());
    assert!(d.open(fifo.nodeid, libc::O_RDONLY | libc::O_NONBLOCK).is_err(), "the host never opens a FIFO");
}

/// A request header for `opcode` claiming `len` bytes.
fn header(opcode: u32, unique: u64, len: u32) -> Vec<u8> {
    InHeader { len, opcode, unique, nodeid: ROOT_ID, ..Default::default() }.as_slice().to_vec()
}

#[test]
fn malformed_requests_get_error_replies_and_the_queue_keeps_working() {
    let dir = share();
    let mut d = FuseDriver::mounted(&config(&dir));
    let q = REQUEST_QUEUE;
    let error_of = |d: &FuseDriver, used: u32| -> (i32, u64) {
        assert_eq!(used, 16, "an error reply is a bare header");
        let (out, _) = d.reply(used);
        (-out.error, out.unique)
    };

    // Too short for a header.
    let used = d.submit_raw(q, &[1, 2, 3], 4096);
    assert_eq!(error_of(&d, used), (libc::EINVAL, 0));
    // No readable part at all.
    let used = d.submit(q, &[(REPLY, 4096, WRITE)]);
    assert_eq!(error_of(&d, used), (libc::EINVAL, 0));
    // Opcodes the library has no variant for.
    for opcode in [7, 19, 50, 4096, u32::MAX] {
        let used = d.submit_raw(q, &header(opcode, 70, 40), 4096);
        assert_eq!(error_of(&d, used), (libc::ENOSYS, 70), "opcode {opcode}");
    }
    // A known opcode the share does not implement.
    let mut bmap = header(Opcode::Bmap as u32, 71, 56);
    bmap.extend_from_slice(&[0; 16]);
    let used = d.submit_raw(q, &bmap, 4096);
    assert_eq!(error_of(&d, used), (libc::ENOSYS, 71));
    // Absurd lengths: far over the maximum, under the header size, over what was sent.
    let mut lookup = header(Opcode::Lookup as u32, 72, u32::MAX);
    lookup.extend_from_slice(&cstr("hello.txt"));
    let used = d.submit_raw(q, &lookup, 4096);
    assert_eq!(error_of(&d, used), (libc::ENOMEM, 72));
    for len in [0, 10, 39, 4000] {
        let mut lookup = header(Opcode::Lookup as u32, 73, len);
        lookup.extend_from_slice(&cstr("hello.txt"));
        let used = d.submit_raw(q, &lookup, 4096);
        assert_eq!(error_of(&d, used), (libc::EINVAL, 73), "len {len}");
    }
    // A name without its NUL, truncated arguments.
    let mut lookup = header(Opcode::Lookup as u32, 74, 45);
    lookup.extend_from_slice(b"hello");
    let used = d.submit_raw(q, &lookup, 4096);
    assert_eq!(error_of(&d, used), (libc::EINVAL, 74));
    let used = d.submit_raw(q, &header(Opcode::Read as u32, 75, 48), 4096);
    assert_eq!(error_of(&d, used), (libc::EINVAL, 75));
    // A READ of 4 GiB, a reply buffer too small for the reply, and none at all.
    let hello = d.lookup(ROOT_ID, "hello.txt").unwrap();
    let file = d.open(hello.nodeid, libc::O_RDONLY).unwrap();
    let mut read = header(Opcode::Read as u32, 76, 80);
    read[16..24].copy_from_slice(&hello.nodeid.to_le_bytes());
    read.extend_from_slice(ReadIn { fh: file.fh, size: u32::MAX, ..Default::default() }.as_slice());
    let used = d.submit_raw(q, &read, 4096);
    let (out, _) = d.reply(used);
    assert!(out.error < 0 || out.len <= 4096, "{out:?}");
    let used = d.submit_raw(q, &header(Opcode::Getattr as u32, 77, 56), 8);
    assert_eq!(used, 0, "no room even for an error header");
    let used = d.submit_raw(q, &header(Opcode::Getattr as u32, 78, 56), 0);
    assert_eq!(used, 0);
    // Buffers outside guest memory.
    let used = d.submit(q, &[(MEM_SIZE as u64 - 8, 64, READ), (REPLY, 4096, WRITE)]);
    assert_eq!(error_of(&d, used), (libc::EINVAL, 0));
    let used = d.submit(q, &[(REQ, 56, READ), (u64::MAX - 8, 4096, WRITE)]);
    assert_eq!(used, 0);
    // A BATCH_FORGET claiming millions of entries: no reply (forgets have none).
    let mut forget = header(Opcode::BatchForget as u32, 79, 48);
    forget.extend_from_slice(BatchForgetIn { count: u32::MAX, dummy: 0 }.as_slice());
    assert_eq!(d.submit_raw(0, &forget, 0), 0);
    // Requests on inodes and handles that do not exist.
    assert_eq!(d.getattr(0xdead_beef).map(|_| ()), Err(libc::EBADF));
    assert_eq!(d.read(hello.nodeid, 0xdead_beef, 0, 10), Err(libc::EBADF));

    // Still serving.
    assert_eq!(d.read(hello.nodeid, file.fh, 0, 5).unwrap(), b"hello");
    assert_eq!(d.root_attr().attr.ino, std::fs::metadata(dir.path()).unwrap().ino());
}

#[test]
fn forgets_on_the_hiprio_queue_have_no_reply() {
    let dir = share();
    let mut d = FuseDriver::mounted(&config(&dir));
    let hello = d.lookup(ROOT_ID, "hello.txt").unwrap();
    let mut forget =
        InHeader { len: 48, opcode: Opcode::Forget as u32, unique: 9, nodeid: hello.nodeid, ..Default::default() }
            .as_slice()
            .to_vec();
    forget.extend_from_slice(&1u64.to_le_bytes());
    assert_eq!(d.submit_raw(0, &forget, 0), 0);
    // The inode is gone once the last lookup is forgotten.
    assert_eq!(d.getattr(hello.nodeid).map(|_| ()), Err(libc::EBADF));
    assert!(d.lookup(ROOT_ID, "hello.txt").is_ok());
}

#[test]
fn destroy_is_answered_and_a_new_init_starts_over() {
    let dir = share();
    let mut d = FuseDriver::mounted(&config(&dir));
    let hello = d.lookup(ROOT_ID, "hello.txt").unwrap();
    let used = d.submit_raw(REQUEST_QUEUE, &header(Opcode::Destroy as u32, 90, 40), 4096);
    assert_eq!(used, 16);
    let (out, _) = d.reply(used);
    assert_eq!((out.error, out.unique), (0, 90));
    assert_eq!(d.getattr(hello.nodeid).map(|_| ()), Err(libc::EBADF), "inodes of the old session are gone");
    d.init().unwrap();
    assert_eq!(d.lookup(ROOT_ID, "hello.txt").unwrap().attr.size, 20);
}

#[test]
fn each_wakeup_has_a_budget_and_rearms_itself() {
    let dir = share();
    let mut d = FuseDriver::mounted(&config(&dir));
    let ring = &d.rings[REQUEST_QUEUE];
    let before = ring.used_idx();
    let n = MAX_REQUESTS_PER_WAKEUP as u16 + 5;
    let getattr = header(Opcode::Getattr as u32, 1, 56);
    let mut request = getattr.clone();
    request.extend_from_slice(&[0; 16]);
    d.mem.write_slice(&request, GuestAddress(REQ)).unwrap();
    for i in 0..n {
        ring.add_chain_at(2 * i, &[(REQ, 56, READ), (REPLY + 0x100 * u64::from(i), 0x100, WRITE)]);
    }
    d.dev.handle_queue_event(REQUEST_QUEUE);
    let ring = &d.rings[REQUEST_QUEUE];
    assert_eq!(ring.used_idx().wrapping_sub(before), MAX_REQUESTS_PER_WAKEUP as u16);
    assert_eq!(d.dev.queue_events()[REQUEST_QUEUE].read().unwrap(), 1, "re-armed for the rest");
    d.dev.handle_queue_event(REQUEST_QUEUE);
    assert_eq!(d.rings[REQUEST_QUEUE].used_idx().wrapping_sub(before), n);
    let (_, len) = d.rings[REQUEST_QUEUE].used_elem(before.wrapping_add(n - 1));
    assert_eq!(len as usize, 16 + std::mem::size_of::<fuse_backend_rs::abi::fuse_abi::AttrOut>());
}

#[test]
fn reset_ends_the_fuse_session() {
    let dir = share();
    let mut d = FuseDriver::mounted(&config(&dir));
    let hello = d.lookup(ROOT_ID, "hello.txt").unwrap();
    let file = d.open(hello.nodeid, libc::O_RDONLY).unwrap();
    assert!(d.dev.reset());
    assert!(!d.dev.is_activated());
    // A new driver: fresh rings (indices start again), a new FUSE INIT.
    d.rings = vec![GuestRing::new(&d.mem, 0, 16), GuestRing::new(&d.mem, 0x4000, 128)];
    let queues = d.rings.iter().map(GuestRing::queue).collect();
    d.dev.activate(d.mem.clone(), d.irq.clone(), queues).unwrap();
    d.init().unwrap();
    assert_eq!(d.read(hello.nodeid, file.fh, 0, 5), Err(libc::EBADF), "handles of the old session are gone");
    let hello = d.lookup(ROOT_ID, "hello.txt").unwrap();
    let file = d.open(hello.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(d.read(hello.nodeid, file.fh, 0, 5).unwrap(), b"hello");
}

#[test]
fn served_from_the_event_manager() {
    let dir = share();
    let dev = Arc::new(Mutex::new(SharedDir::new(&config(&dir)).unwrap()));
    let mut events = EventManager::<Arc<Mutex<SharedDir>>>::new().unwrap();
    events.add_subscriber(dev.clone());
    let mem = guest_memory();
    let rings = [GuestRing::new(&mem, 0, 16), GuestRing::new(&mem, 0x4000, 16)];
    let irq = RecordingInterrupt::new();
    dev.lock().unwrap().activate(mem.clone(), irq.clone(), rings.iter().map(GuestRing::queue).collect()).unwrap();
    // Activation arms both queues: served without a kick.
    assert!(events.run_with_timeout(1000).unwrap() >= 1);
    let mut init = header(Opcode::Init as u32, 5, 56);
    init.extend_from_slice(&[KERNEL_VERSION, 33, 0, 0].map(u32::to_le_bytes).concat());
    mem.write_slice(&init, GuestAddress(REQ)).unwrap();
    rings[1].add_chain_at(0, &[(REQ, 56, READ), (REPLY, 4096, WRITE)]);
    dev.lock().unwrap().queue_events()[1].write(1).unwrap();
    assert_eq!(events.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(rings[1].used_idx(), 1);
    let out: OutHeader = mem.read_obj(GuestAddress(REPLY)).unwrap();
    assert_eq!((out.error, out.unique), (0, 5));
    assert_eq!(irq.take(), vec![InterruptKind::Queue]);
}

/// A file system whose LOOKUP panics, standing in for a bug in the library.
struct PanickingFs;

impl FileSystem for PanickingFs {
    type Inode = u64;
    type Handle = u64;

    fn lookup(&self, _ctx: &Context, _parent: u64, _name: &CStr) -> std::io::Result<Entry> {
        panic!("bug in the file system");
    }

    fn getattr(
        &self,
        _ctx: &Context,
        _inode: u64,
        _handle: Option<u64>,
    ) -> std::io::Result<(stat64, std::time::Duration)> {
        // SAFETY: stat64 is plain data; all zeroes is a valid value.
        Ok((unsafe { std::mem::zeroed() }, std::time::Duration::ZERO))
    }

    fn statfs(&self, _ctx: &Context, _inode: u64) -> std::io::Result<statvfs64> {
        Err(std::io::Error::from_raw_os_error(libc::ENOSYS))
    }
}

#[test]
fn a_panic_in_the_server_becomes_an_eio_reply() {
    let server = Server::new(PanickingFs);
    let mem = guest_memory();
    let ring = GuestRing::new(&mem, 0, 16);
    let mut queue = ring.queue();
    let mut lookup = header(Opcode::Lookup as u32, 42, 44);
    lookup.extend_from_slice(&cstr("boo"));
    mem.write_slice(&lookup, GuestAddress(REQ)).unwrap();
    ring.add_chain_at(0, &[(REQ, 44, READ), (REPLY, 4096, WRITE)]);
    let chain = queue.pop_descriptor_chain(&mem).unwrap();
    let served = request::serve(&server, &mem, chain);
    assert!(matches!(served.problem, Some(BadRequest::Panicked { opcode: 1, .. })));
    assert_eq!(served.used_len, 16);
    let out: OutHeader = mem.read_obj(GuestAddress(REPLY)).unwrap();
    assert_eq!((out.error, out.unique), (-libc::EIO, 42));
    // The next request is served normally.
    let mut getattr = header(Opcode::Getattr as u32, 43, 56);
    getattr.extend_from_slice(&[0; 16]);
    mem.write_slice(&getattr, GuestAddress(REQ)).unwrap();
    ring.add_chain_at(0, &[(REQ, 56, READ), (REPLY, 4096, WRITE)]);
    let chain = queue.pop_descriptor_chain(&mem).unwrap();
    let served = request::serve(&server, &mem, chain);
    assert!(served.problem.is_none());
    let out: OutHeader = mem.read_obj(GuestAddress(REPLY)).unwrap();
    assert_eq!((out.error, out.unique), (0, 43));
}

/// A share with `n` files `f0`, `f1`, ... besides `share()`'s.
fn share_with_files(n: usize) -> tempfile::TempDir {
    let dir = share();
    for i in 0..n {
        std::fs::write(dir.path().join(format!("f{i}")), b"x").unwrap();
    }
    dir
}

#[test]
fn lookups_past_the_inode_cap_fail_with_enfile_until_the_guest_forgets() {
    let dir = share_with_files(3);
    let mut cfg = config(&dir);
    cfg.max_inodes = 2;
    let mut d = FuseDriver::mounted(&cfg);
    let f0 = d.lookup(ROOT_ID, "f0").unwrap().nodeid;
    let sub = d.lookup(ROOT_ID, "sub").unwrap().nodeid;
    // More lookups of inodes already held, and of the root, take no room.
    assert_eq!(d.lookup(ROOT_ID, "f0").unwrap().nodeid, f0);
    assert_eq!(d.lookup(ROOT_ID, "..").unwrap().nodeid, ROOT_ID);
    assert_eq!(d.lookup(sub, "..").unwrap().nodeid, ROOT_ID);
    assert_eq!(d.dev.holdings().0, 2);
    // A third inode is one too many, however it is reached.
    assert_eq!(d.lookup(ROOT_ID, "f1").map(|_| ()), Err(libc::ENFILE));
    assert_eq!(d.lookup(sub, "inner.txt").map(|_| ()), Err(libc::ENFILE));
    assert_eq!(d.mkdir(ROOT_ID, "newdir", 0o755).map(|_| ()), Err(libc::ENFILE));
    assert!(!dir.path().join("newdir").exists(), "nothing is created past the cap");
    assert_eq!(d.mknod(ROOT_ID, "fifo", libc::S_IFIFO | 0o644, 0).map(|_| ()), Err(libc::ENFILE));
    assert_eq!(d.create(ROOT_ID, "new.txt", libc::O_RDWR, 0o644).map(|_| ()), Err(libc::ENFILE));
    assert!(!dir.path().join("new.txt").exists());
    assert_eq!(d.dev.holdings().0, 2, "refused lookups hold nothing");
    // f0 was looked up twice: one FORGET of 1 keeps it, a second frees its place.
    d.forget(f0, 1);
    assert_eq!(d.lookup(ROOT_ID, "f1").map(|_| ()), Err(libc::ENFILE));
    d.forget(f0, 1);
    assert_eq!(d.dev.holdings().0, 1);
    let f1 = d.lookup(ROOT_ID, "f1").unwrap();
    assert_eq!(d.getattr(f1.nodeid).unwrap().attr.ino, f1.attr.ino);
    // DESTROY drops everything, and so do the counts.
    let used = d.submit_raw(REQUEST_QUEUE, &header(Opcode::Destroy as u32, 90, 40), 4096);
    assert_eq!(d.reply(used).0.error, 0);
    assert_eq!(d.dev.holdings(), (0, 0));
}

#[test]
fn opens_past_the_handle_cap_fail_with_enfile_until_the_guest_releases() {
    let dir = share();
    let mut cfg = config(&dir);
    cfg.max_handles = 2;
    let mut d = FuseDriver::mounted(&cfg);
    let hello = d.lookup(ROOT_ID, "hello.txt").unwrap().nodeid;
    let fh1 = d.open(hello, libc::O_RDONLY).unwrap().fh;
    let dh = d.opendir(ROOT_ID).unwrap().fh;
    assert_eq!(d.dev.holdings().1, 2);
    assert_eq!(d.open(hello, libc::O_RDONLY).map(|_| ()), Err(libc::ENFILE));
    assert_eq!(d.opendir(ROOT_ID).map(|_| ()), Err(libc::ENFILE));
    assert_eq!(d.create(ROOT_ID, "new.txt", libc::O_RDWR, 0o644).map(|_| ()), Err(libc::ENFILE));
    assert!(!dir.path().join("new.txt").exists(), "nothing is created past the cap");
    // A RELEASE of a handle that does not exist frees nothing.
    assert_eq!(d.release(hello, 9999), Err(libc::EBADF));
    assert_eq!(d.open(hello, libc::O_RDONLY).map(|_| ()), Err(libc::ENFILE));
    d.release(hello, fh1).unwrap();
    let fh2 = d.open(hello, libc::O_RDONLY).unwrap().fh;
    assert_eq!(d.read(hello, fh2, 0, 5).unwrap(), b"hello");
    d.releasedir(ROOT_ID, dh).unwrap();
    let (entry, opened) = d.create(ROOT_ID, "new.txt", libc::O_RDWR, 0o644).unwrap();
    assert!(dir.path().join("new.txt").exists());
    assert_eq!(d.dev.holdings().1, 2);
    d.release(entry.nodeid, opened.fh).unwrap();
    assert_eq!(d.dev.holdings().1, 1);
}

#[test]
fn readdirplus_past_the_inode_cap_lists_names_without_inodes() {
    let dir = share_with_files(3);
    let mut cfg = config(&dir);
    cfg.max_inodes = 2;
    let mut d = FuseDriver::mounted(&cfg);
    let dh = d.opendir(ROOT_ID).unwrap().fh;
    let mut listed = d.readdirplus(ROOT_ID, dh).unwrap();
    listed.sort();
    let names: Vec<&str> = listed.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["f0", "f1", "f2", "hello.txt", "sub"], "every name is listed");
    let with_inode: Vec<u64> = listed.iter().map(|&(_, id)| id).filter(|&id| id != 0).collect();
    assert_eq!(with_inode.len(), 2, "{listed:?}");
    assert_eq!(d.dev.holdings().0, 2, "the entries past the cap hold nothing");
    let skipped = listed.iter().find(|(_, id)| *id == 0).unwrap().0.clone();
    assert_eq!(d.lookup(ROOT_ID, &skipped).map(|_| ()), Err(libc::ENFILE));
    // The listed inodes are real: the guest can use and forget them.
    for id in with_inode {
        assert!(d.getattr(id).is_ok());
        d.forget(id, 1);
    }
    assert_eq!(d.dev.holdings().0, 0);
    assert!(d.lookup(ROOT_ID, &skipped).is_ok());
    d.releasedir(ROOT_ID, dh).unwrap();
}

#[test]
fn a_snapshot_is_taken_only_while_the_share_is_not_mounted() {
    let dir = share();
    let mut d = FuseDriver::new(&config(&dir));
    let before = d.dev.queue_positions().expect("an unmounted share can be snapshotted");
    assert_eq!(before.len(), 2, "hiprio and the request queue");
    d.init().unwrap();
    let e = d.dev.queue_positions().unwrap_err();
    assert!(e.starts_with("the guest has virtio-fs share 'wisp-test' mounted"), "{e}");
    // Unmounted again (FUSE DESTROY): its session is gone, the queues moved on.
    let used = d.submit_raw(REQUEST_QUEUE, &header(Opcode::Destroy as u32, 90, 40), 4096);
    assert_eq!(d.reply(used).0.error, 0);
    let after = d.dev.queue_positions().expect("the session ended");
    assert_eq!(after[REQUEST_QUEUE].next_avail, before[REQUEST_QUEUE].next_avail.wrapping_add(2));
}
