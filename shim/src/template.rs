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
//! the agent's start; no pod's code or data had reached it. Still, that VMM's directory
//! is its to write, so only a regular file with one link moves from it (opened without
//! following a symlink or blocking on a FIFO, then checked to be the same inode after
//! the rename), and a restoring VMM gets the files read-only in its jail.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
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
    _lock: std::fs::File,
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
        let open = |name: &str| dir.open_file(Path::new(name), libc::O_RDONLY | libc::O_NONBLOCK, 0);
        let regular = |name: &str| open(name).and_then(|f| f.metadata()).is_ok_and(|m| m.file_type().is_file());
        if !regular(STATE_FILE) || !regular(MEMORY_FILE) {
            return false;
        }
        // The shape file: at most 4 KiB of it are read (it is a few hundred bytes).
        let mut text = Vec::new();
        let read = open(SHAPE_FILE).and_then(|f| io::Read::read_to_end(&mut io::Read::take(f, 4096), &mut text));
        read.is_ok() && text == shape.as_bytes()
    }

    /// `<key>.lock`, locked exclusively; None if another process holds it.
    fn lock(&self, key: &str) -> io::Result<Option<std::fs::File>> {
        let f = self.dir.open_file(Path::new(&format!("{key}.lock")), libc::O_CREAT | libc::O_RDWR, 0o600)?;
        // SAFETY: flock(2) on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::EWOULDBLOCK) { Ok(None) } else { Err(e) };
        }
        Ok(Some(f))
    }

    /// Moves the snapshot files a VMM wrote into `from` (as `STATE_FILE` and
    /// `MEMORY_FILE`) into the template of `maker`, replacing an older one.
    pub fn install(&self, maker: Maker, from: &Path) -> io::Result<Template> {
        let tmp = format!(".{}.new", maker.key);
        let installed = self.install_via(&maker, from, &tmp);
        if installed.is_err() {
            // What was moved so far goes; nothing half-made stays behind.
            if let Err(e) = self.dir.remove_tree(Path::new(&tmp)) {
                log::warn!("removing {}/{tmp}: {e}", self.dir.path().display());
            }
        }
        installed
    }

    fn install_via(&self, maker: &Maker, from: &Path, tmp: &str) -> io::Result<Template> {
        let from = Dir::open_trusted(from)?;
        self.dir.remove_tree(Path::new(tmp))?;
        let new = self.dir.mkdir_all(Path::new(tmp), 0o700)?;
        for name in [STATE_FILE, MEMORY_FILE] {
            // The VMM's directory: only a regular file of its own moves (never a
            // symlink, a FIFO, a device, a directory or a hard link it could have put
            // there), and what arrived is checked to be the very file that was
            // checked, so a name swapped in between is refused too.
            let file = from.open_file(Path::new(name), libc::O_RDONLY | libc::O_NONBLOCK, 0)?;
            let meta = file.metadata()?;
            if !meta.file_type().is_file() || meta.nlink() != 1 {
                return Err(io::Error::other(format!(
                    "{name} in {} is not a regular file with one link",
                    from.path().display()
                )));
            }
            from.rename(name, &new, name, 0)
                .map_err(|e| io::Error::new(e.kind(), format!("moving {name} from {}: {e}", from.path().display())))?;
            let moved = new.open_file(Path::new(name), libc::O_RDONLY | libc::O_NONBLOCK, 0)?.metadata()?;
            if (moved.dev(), moved.ino()) != (meta.dev(), meta.ino()) {
                return Err(io::Error::other(format!("{name} in {} changed while it moved", from.path().display())));
            }
            // The template is root's alone, whatever mode the VMM gave it.
            file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
        let create = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL;
        new.open_file(Path::new(SHAPE_FILE), create, 0o600)?.write_all(maker.shape.as_bytes())?;
        let key = maker.key.clone();
        let replacing = |e: io::Error| io::Error::new(e.kind(), format!("installing template {key}: {e}"));
        match self.dir.rename(tmp, &self.dir, &key, libc::RENAME_NOREPLACE) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                // A stale template: swap the two, then remove the old one (a VMM that
                // is restoring it keeps what it already mapped).
                self.dir.rename(tmp, &self.dir, &key, libc::RENAME_EXCHANGE).map_err(replacing)?;
                self.dir.remove_tree(Path::new(tmp))?;
            }
            Err(e) => return Err(replacing(e)),
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

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
    fn what_the_vmm_planted_is_never_moved_and_a_missing_file_is_no_template() {
        let d = tempfile::tempdir().unwrap();
        let c = config(d.path());
        let t = Templates::open(&c.runtime.state_dir).unwrap();
        let shape = Shape::of(&c, &[]).unwrap();
        let secret = d.path().join("secret");
        std::fs::write(&secret, "host file").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        // A compromised VMM's tricks in place of its memory file: a symlink or a hard
        // link to a host file (the install would chmod it and a restore would map it),
        // a FIFO (an open would block the shim), a directory.
        let plants: [(&str, &dyn Fn(&Path)); 4] = [
            ("symlink", &|p| std::os::unix::fs::symlink(&secret, p).unwrap()),
            ("hard link", &|p| std::fs::hard_link(&secret, p).unwrap()),
            ("fifo", &|p| nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()),
            ("directory", &|p| std::fs::create_dir(p).unwrap()),
        ];
        for (i, (what, plant)) in plants.iter().enumerate() {
            let Plan::Make(m) = t.plan(&shape) else { panic!("{what}: the template should be missing") };
            let vmm_dir = d.path().join(format!("pod-vmm-{i}"));
            std::fs::create_dir(&vmm_dir).unwrap();
            std::fs::write(vmm_dir.join(STATE_FILE), "state").unwrap();
            plant(&vmm_dir.join(MEMORY_FILE));
            let e = t.install(m, &vmm_dir).unwrap_err().to_string();
            assert!(e.contains("vm.mem"), "{what}: {e}");
            assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host file", "{what}");
            let mode = std::fs::metadata(&secret).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o644, "{what}: the host file's mode was changed");
            // Nothing was installed or left half-made; the lock went with the maker: the
            // next pod makes it.
            let left: Vec<String> = std::fs::read_dir(c.runtime.state_dir.join(TEMPLATES_DIR))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.ends_with(".lock"))
                .collect();
            assert!(left.is_empty(), "{what}: left {left:?}");
            assert!(matches!(t.plan(&shape), Plan::Make(_)), "{what}");
        }
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
