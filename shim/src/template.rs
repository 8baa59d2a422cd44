//! VM templates (`hypervisor.templates`): a pod's VM starts by restoring a snapshot of a
//! VM of the same shape that booted until its agent answered, before anything of any pod
//! reached it. `vmpod.rs` decides when; this file keeps the templates.
//!
//! Under `<state_dir>/templates/` (0700, root's):
//! - `<key>/`: a template: `vm.snap` (the VM's state), `vm.mem` (its guest memory, which
//!   every VMM restored from it maps copy-on-write, so the pages no guest changed are
//!   one page-cache copy for all of them) and `shape` (what it was made from);
//! - `<key>.lock`: held (`flock`) by the one pod making that template.
//!
//! `<key>` names the configured shape (`Shape::key`: VMM, kernel and initrd paths, vCPUs,
//! memory, kernel parameters, console, NICs); the `shape` file adds the identity of each
//! input file. A template whose `shape` differs from the pod's (a kernel, initrd or
//! wisp-vmm replaced) is stale and is made again, in place: one template per configured
//! shape, never shared between shapes. wisp-vmm itself refuses a snapshot of another
//! build, host kernel or CPU; such a template fails to restore and is made again (on a
//! tmpfs state directory, as by default, a host kernel upgrade's reboot clears them
//! anyway).
//!
//! The first pod of a shape that gets the lock makes the template: it boots cold with
//! the template's MACs, the shim closes its agent connection, and wisp-vmm writes the
//! snapshot into its own directory (the only one its jail may write); the files then
//! move here, and that pod goes on from the same VM. A pod that finds the lock taken
//! boots cold without waiting. Whatever fails on the template's side costs a cold boot
//! and a warning, never the pod.
//!
//! Trust: the files are written by a VMM whose guest had run nothing but the kernel and
//! the agent's start; no pod's code or data had reached it. They are moved here only
//! as regular files (`renameat` of names checked with `AT_SYMLINK_NOFOLLOW`), and a
//! restoring VMM gets them read-only in its jail.

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use wisp_config::Config;

use crate::hostfs::Dir;

/// The templates' directory below the state directory.
pub const TEMPLATES_DIR: &str = "templates";
pub const STATE_FILE: &str = "vm.snap";
pub const MEMORY_FILE: &str = "vm.mem";
const SHAPE_FILE: &str = "shape";
/// Bumped when what a template holds or how it is made changes: older ones are stale.
const LAYOUT_VERSION: u32 = 1;

/// The MAC of NIC `i` of a template's VM (and so of every VM restored from it): locally
/// administered, unicast. The agent gives each NIC the pod's own MAC (`device_mac` in
/// UpdateInterface).
pub fn template_mac(i: usize) -> String {
    format!("02:77:69:73:70:{:02x}", i.min(255))
}

/// Everything a pod's VM must share with a template to be restored from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// The configured part: names the template (`key`).
    configured: String,
    /// The configured part and the inputs' identities: what `shape` holds.
    full: String,
}

impl Shape {
    /// The shape of a VM booted with `config` and NICs of these MTUs (0: the VMM's
    /// default); fails if an input file cannot be read.
    pub fn of(config: &Config, nic_mtus: &[u32]) -> io::Result<Self> {
        let h = &config.hypervisor;
        let mtus: Vec<String> = nic_mtus.iter().map(u32::to_string).collect();
        let configured = format!(
            "layout {LAYOUT_VERSION}\nvmm {}\nkernel {}\ninitrd {}\nvcpus {}\nmemory_mib {}\nkernel_params {}\n\
             console {}\nnics [{}]\n",
            h.path.display(),
            h.kernel.display(),
            h.initrd.display(),
            h.vcpus,
            h.memory_mib,
            h.kernel_params,
            config.runtime.debug,
            mtus.join(","),
        );
        let mut full = configured.clone();
        for (what, path) in [("vmm", &h.path), ("kernel", &h.kernel), ("initrd", &h.initrd)] {
            full += &format!("{what}-file {}\n", file_identity(path)?);
        }
        Ok(Self { configured, full })
    }

    /// The template's directory name: 16 hex digits of a hash of the configured shape.
    pub fn key(&self) -> String {
        format!("{:016x}", fnv1a(self.configured.as_bytes()))
    }
}

/// A file's identity: device, inode, size and modification time. Replacing or
/// rewriting the file changes it.
fn file_identity(path: &Path) -> io::Result<String> {
    let m = std::fs::metadata(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    Ok(format!("{}:{}:{}:{}.{:09}", m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// FNV-1a, 64 bits: a stable name, not a security boundary (the `shape` file inside is
/// compared in full).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// A template ready to restore.
#[derive(Debug)]
pub struct Template {
    pub key: String,
    pub state: PathBuf,
    pub memory: PathBuf,
}

/// The right to make one shape's template: its lock, held until dropped.
#[derive(Debug)]
pub struct Maker {
    key: String,
    shape: String,
    _lock: OwnedFd,
}

/// What a pod's VM starts from.
#[derive(Debug)]
pub enum Plan {
    Restore(Template),
    /// Boot cold with the template's MACs and make the template.
    Make(Maker),
    /// Boot cold, as without templates (the reason is logged).
    Cold(String),
}

/// The templates of one state directory.
pub struct Templates {
    dir: Dir,
}

impl Templates {
    /// Opens (creating, 0700) `<state_dir>/templates`.
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        let path = state_dir.join(TEMPLATES_DIR);
        crate::hostfs::create_dir_all_mode(&path, 0o700)?;
        Ok(Self { dir: Dir::open_trusted(&path)? })
    }

    /// Restore the template of `shape` if there is a current one; else make it if no
    /// other pod is making it; else boot cold.
    pub fn plan(&self, shape: &Shape) -> Plan {
        let key = shape.key();
        if self.current(&key, &shape.full) {
            let dir = self.dir.path().join(&key);
            return Plan::Restore(Template { state: dir.join(STATE_FILE), memory: dir.join(MEMORY_FILE), key });
        }
        match self.lock(&key) {
            Ok(Some(lock)) => {
                // Another pod may have made it while we took the lock.
                if self.current(&key, &shape.full) {
                    let dir = self.dir.path().join(&key);
                    return Plan::Restore(Template { state: dir.join(STATE_FILE), memory: dir.join(MEMORY_FILE), key });
                }
                Plan::Make(Maker { key, shape: shape.full.clone(), _lock: lock })
            }
            Ok(None) => Plan::Cold(format!("another pod is making template {key}")),
            Err(e) => Plan::Cold(format!("cannot lock template {key}: {e}")),
        }
    }

    /// Whether `<key>/` holds a template made from `shape`: its shape file says so and
    /// both snapshot files are regular files.
    fn current(&self, key: &str, shape: &str) -> bool {
        let Ok(dir) = self.dir.open_dir(Path::new(key)) else { return false };
        let regular = |name: &str| stat_at(&dir, name).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
        if !regular(STATE_FILE) || !regular(MEMORY_FILE) || !regular(SHAPE_FILE) {
            return false;
        }
        read_small_at(&dir, SHAPE_FILE).is_ok_and(|text| text == shape.as_bytes())
    }

    /// `<key>.lock`, locked exclusively; None if another process holds it.
    fn lock(&self, key: &str) -> io::Result<Option<OwnedFd>> {
        let name = CString::new(format!("{key}.lock")).map_err(io::Error::other)?;
        let flags = libc::O_CREAT | libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: openat(2) on our directory fd with a NUL-terminated name.
        let fd = unsafe { libc::openat(self.dir.as_fd().as_raw_fd(), name.as_ptr(), flags, 0o600) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: flock(2) on an fd we own.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(None) } else { Err(e) };
        }
        Ok(Some(fd))
    }

    /// Moves the snapshot files a VMM wrote into `from` (as `STATE_FILE` and
    /// `MEMORY_FILE`) into the template of `maker`, replacing an older one.
    pub fn install(&self, maker: Maker, from: &Path) -> io::Result<Template> {
        let from = Dir::open_trusted(from)?;
        let tmp = format!(".{}.new", maker.key);
        self.dir.remove_tree(Path::new(&tmp))?;
        let new = self.dir.mkdir_all(Path::new(&tmp), 0o700)?;
        for name in [STATE_FILE, MEMORY_FILE] {
            // The VMM's directory: only a regular file moves (never a symlink, a
            // device or a directory it could have put there).
            let st = stat_at(&from, name)?;
            if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                return Err(io::Error::other(format!("{name} in {} is not a regular file", from.path().display())));
            }
            rename_at(&from, name, &new, name, 0)?;
            // The template is root's alone, whatever mode the VMM gave it.
            chmod_at(&new, name, 0o600)?;
        }
        write_new_at(&new, SHAPE_FILE, maker.shape.as_bytes())?;
        let key = maker.key.clone();
        match rename_at(&self.dir, &tmp, &self.dir, &key, libc::RENAME_NOREPLACE) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                // A stale template: swap the two, then remove the old one (a VMM that
                // is restoring it keeps what it already mapped).
                rename_at(&self.dir, &tmp, &self.dir, &key, libc::RENAME_EXCHANGE)?;
                self.dir.remove_tree(Path::new(&tmp))?;
            }
            Err(e) => return Err(e),
        }
        let dir = self.dir.path().join(&key);
        Ok(Template { state: dir.join(STATE_FILE), memory: dir.join(MEMORY_FILE), key })
    }

    /// Removes a template that could not be restored, so that the next pod of its shape
    /// makes it again; left alone while a pod is making it.
    pub fn discard(&self, t: &Template) {
        match self.lock(&t.key) {
            Ok(Some(_lock)) => {
                if let Err(e) = self.dir.remove_tree(Path::new(&t.key)) {
                    log::warn!("removing template {}: {e}", t.key);
                }
            }
            Ok(None) => {}
            Err(e) => log::warn!("cannot lock template {} to remove it: {e}", t.key),
        }
    }
}

fn cname(name: &str) -> io::Result<CString> {
    CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} has a NUL byte")))
}

/// `fstatat` of `name` in `dir`, not following a symlink.
fn stat_at(dir: &Dir, name: &str) -> io::Result<libc::stat> {
    let c = cname(name)?;
    // SAFETY: stat is plain data that fstatat fills.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstatat(2) on a directory fd with a NUL-terminated name and a valid buffer.
    if unsafe { libc::fstatat(dir.as_fd().as_raw_fd(), c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{}/{name}: {e}", dir.path().display())));
    }
    Ok(st)
}

fn rename_at(from: &Dir, old: &str, to: &Dir, new: &str, flags: libc::c_uint) -> io::Result<()> {
    let (o, n) = (cname(old)?, cname(new)?);
    // SAFETY: renameat2(2) between two directory fds with NUL-terminated names.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            from.as_fd().as_raw_fd(),
            o.as_ptr(),
            to.as_fd().as_raw_fd(),
            n.as_ptr(),
            flags,
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        // The caller tells an existing target from other failures by the errno.
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Err(e);
        }
        return Err(io::Error::new(
            e.kind(),
            format!("moving {}/{old} to {}/{new}: {e}", from.path().display(), to.path().display()),
        ));
    }
    Ok(())
}

fn chmod_at(dir: &Dir, name: &str, mode: libc::mode_t) -> io::Result<()> {
    let c = cname(name)?;
    // SAFETY: fchmodat(2) on a directory fd with a NUL-terminated name (checked to be a
    // regular file just before; fchmodat never follows a symlink it cannot chmod).
    if unsafe { libc::fchmodat(dir.as_fd().as_raw_fd(), c.as_ptr(), mode, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn open_at(dir: &Dir, name: &str, flags: i32) -> io::Result<std::fs::File> {
    let c = cname(name)?;
    // SAFETY: openat(2) on a directory fd with a NUL-terminated name.
    let fd =
        unsafe { libc::openat(dir.as_fd().as_raw_fd(), c.as_ptr(), flags | libc::O_NOFOLLOW | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// A file of at most 4 KiB (the shape).
fn read_small_at(dir: &Dir, name: &str) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(open_at(dir, name, libc::O_RDONLY)?, 4096), &mut out)?;
    Ok(out)
}

fn write_new_at(dir: &Dir, name: &str, bytes: &[u8]) -> io::Result<()> {
    open_at(dir, name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL)?.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> Config {
        let mut c = Config::default();
        for (name, f) in [
            ("vmm", &mut c.hypervisor.path),
            ("vmlinux", &mut c.hypervisor.kernel),
            ("initrd", &mut c.hypervisor.initrd),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, name).unwrap();
            *f = p;
        }
        c.runtime.state_dir = dir.join("state");
        c
    }

    /// What a VMM's Snapshot leaves in its directory.
    fn snapshot_in(dir: &Path, tag: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(STATE_FILE), format!("state {tag}")).unwrap();
        std::fs::write(dir.join(MEMORY_FILE), format!("memory {tag}")).unwrap();
    }

    #[test]
    fn the_first_pod_makes_the_template_the_next_restore_it() {
        let d = tempfile::tempdir().unwrap();
        let c = config(d.path());
        let t = Templates::open(&c.runtime.state_dir).unwrap();
        let shape = Shape::of(&c, &[1500]).unwrap();
        let Plan::Make(maker) = t.plan(&shape) else { panic!("no template yet: the first pod makes it") };
        // While it is being made, other pods boot cold.
        assert!(matches!(t.plan(&shape), Plan::Cold(why) if why.contains("another pod is making")));
        let vmm_dir = d.path().join("pod1/vmm");
        snapshot_in(&vmm_dir, "1");
        let made = t.install(maker, &vmm_dir).unwrap();
        assert!(!vmm_dir.join(STATE_FILE).exists(), "the files moved");
        let Plan::Restore(r) = t.plan(&shape) else { panic!("the template is there") };
        assert_eq!((r.state.clone(), r.memory.clone()), (made.state.clone(), made.memory.clone()));
        assert_eq!(std::fs::read_to_string(&r.memory).unwrap(), "memory 1");
        let mode = std::fs::metadata(&r.state).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(c.runtime.state_dir.join(TEMPLATES_DIR)).unwrap().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
    }

    #[test]
    fn shapes_differ_by_every_configured_input_and_by_the_files_themselves() {
        let d = tempfile::tempdir().unwrap();
        let c = config(d.path());
        let base = Shape::of(&c, &[1500]).unwrap();
        let changed = |f: &dyn Fn(&mut Config)| {
            let mut c2 = c.clone();
            f(&mut c2);
            Shape::of(&c2, &[1500]).unwrap()
        };
        for other in [
            changed(&|c| c.hypervisor.vcpus = 2),
            changed(&|c| c.hypervisor.memory_mib = 512),
            changed(&|c| c.hypervisor.kernel_params = "quiet".into()),
            changed(&|c| c.runtime.debug = true),
            Shape::of(&c, &[]).unwrap(),
            Shape::of(&c, &[9000]).unwrap(),
        ] {
            assert_ne!(other.key(), base.key(), "{other:?}");
        }
        // Not in the shape: what a restore binds anew or what does not reach the VM.
        assert_eq!(changed(&|c| c.hypervisor.jail = false), base);
        assert_eq!(changed(&|c| c.agent.rpc_timeout_ms = 1000), base);
        // A rewritten kernel: same key (same configured shape), stale template.
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&c.hypervisor.kernel, "another kernel").unwrap();
        let after = Shape::of(&c, &[1500]).unwrap();
        assert_eq!(after.key(), base.key());
        assert_ne!(after, base);
    }

    #[test]
    fn a_changed_input_makes_the_template_again_in_place() {
        let d = tempfile::tempdir().unwrap();
        let c = config(d.path());
        let t = Templates::open(&c.runtime.state_dir).unwrap();
        let Plan::Make(m) = t.plan(&Shape::of(&c, &[]).unwrap()) else { panic!() };
        snapshot_in(&d.path().join("a"), "old");
        t.install(m, &d.path().join("a")).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
        std::fs::write(&c.hypervisor.initrd, "a new initrd").unwrap();
        let shape = Shape::of(&c, &[]).unwrap();
        let Plan::Make(m) = t.plan(&shape) else { panic!("a stale template is made again") };
        snapshot_in(&d.path().join("b"), "new");
        let made = t.install(m, &d.path().join("b")).unwrap();
        assert_eq!(std::fs::read_to_string(&made.memory).unwrap(), "memory new");
        let Plan::Restore(_) = t.plan(&shape) else { panic!("the new one is current") };
        let names: Vec<String> = std::fs::read_dir(c.runtime.state_dir.join(TEMPLATES_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "one template and its lock, nothing left over: {names:?}");
    }

    #[test]
    fn a_symlink_or_a_missing_file_is_not_a_template_and_is_never_moved() {
        let d = tempfile::tempdir().unwrap();
        let c = config(d.path());
        let t = Templates::open(&c.runtime.state_dir).unwrap();
        let shape = Shape::of(&c, &[]).unwrap();
        let Plan::Make(m) = t.plan(&shape) else { panic!() };
        let vmm_dir = d.path().join("pod-vmm");
        std::fs::create_dir(&vmm_dir).unwrap();
        std::fs::write(vmm_dir.join(STATE_FILE), "state").unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, "host file").unwrap();
        std::os::unix::fs::symlink(&secret, vmm_dir.join(MEMORY_FILE)).unwrap();
        let e = t.install(m, &vmm_dir).unwrap_err().to_string();
        assert!(e.contains("vm.mem") && e.contains("not a regular file"), "{e}");
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host file");
        // Nothing was installed; the lock went with the maker, so the next pod makes it.
        assert!(matches!(t.plan(&shape), Plan::Make(_)));
        // A template directory missing its memory file is not current either.
        let key_dir = c.runtime.state_dir.join(TEMPLATES_DIR).join(shape.key());
        std::fs::create_dir(&key_dir).unwrap();
        std::fs::write(key_dir.join(STATE_FILE), "s").unwrap();
        std::fs::write(key_dir.join(SHAPE_FILE), &shape.full).unwrap();
        assert!(matches!(t.plan(&shape), Plan::Make(_)));
    }

    #[test]
    fn a_template_that_failed_to_restore_is_discarded_unless_one_is_being_made() {
        let d = tempfile::tempdir().unwrap();
        let c = config(d.path());
        let t = Templates::open(&c.runtime.state_dir).unwrap();
        let shape = Shape::of(&c, &[]).unwrap();
        let Plan::Make(m) = t.plan(&shape) else { panic!() };
        snapshot_in(&d.path().join("a"), "1");
        let made = t.install(m, &d.path().join("a")).unwrap();
        t.discard(&made);
        assert!(!made.state.exists());
        let Plan::Make(m) = t.plan(&shape) else { panic!("discarded: made again") };
        t.discard(&made);
        drop(m);
    }

    #[test]
    fn template_macs_are_unicast_locally_administered_and_distinct() {
        let a = wisp_protocols::mac::parse_mac(&template_mac(0)).unwrap();
        let b = wisp_protocols::mac::parse_mac(&template_mac(1)).unwrap();
        assert_eq!(a[0] & 0b11, 0b10);
        assert_ne!(a, b);
    }
}
