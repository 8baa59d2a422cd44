//! What the shim mounts on the host for a container, and how it all comes down again.
//!
//! The container's directory on the share (`share.rs`) is `<cid>/`: the rootfs
//! (containerd's snapshot mounts) at `rootfs/`, and each bind mount of the spec at
//! `mounts/<n>` (a directory or an empty file as mount point). Mount points are created
//! in the host-only skeleton and mounted onto in the guest's read-only view, all through
//! `hostfs` (fd-relative, no symlink followed, no mount crossed). Every host mount is
//! `nosuid,nodev` (the guest's setuid files and device nodes mean nothing on the host);
//! an `ro` bind's top mount is read-only and the mounts below it keep their own flags, as
//! with runc (the guest is told which of them to bind writable again), an `rro` bind is
//! read-only all the way down, a plain `bind` brings no submounts. Binds of the host's
//! `/proc`, `/sys` and `/dev` are refused. Each mount's id is recorded as it is made;
//! `unmount_all` takes down exactly those (newest first), then removes the container's
//! directory, also after a failure halfway through setup.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim_protos::api::Mount;
use nix::mount::MsFlags;

use crate::hostfs::{self, BindAttrs, GUARD};
use crate::mountinfo;
use crate::share::Share;
use crate::spec::{Access, GuestSubmount, GuestSubmounts, SharedBind};

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("creating {path}: {source}")]
    Create { path: String, source: std::io::Error },
    #[error("mounting the rootfs at {target}: {reason}")]
    Rootfs { target: String, reason: String },
    #[error("bind-mounting {source_path} for {destination}: {reason}")]
    Bind { source_path: String, destination: String, reason: String },
}

/// Host trees a wisp pod never gets through the share: they are the host kernel's
/// (processes, devices, sysfs), the guest has its own, and a bind of one would hand the
/// guest a view of, or a device node on, the host.
const REFUSED_BIND_SOURCES: [&str; 3] = ["/proc", "/sys", "/dev"];

/// The host path a bind's source resolves to, unless it is one a pod never gets.
/// Called before the VM starts (`check_bind_sources`) and again when mounting.
fn checked_source(b: &SharedBind) -> Result<PathBuf, MountError> {
    let err = |reason: String| MountError::Bind {
        source_path: b.source.display().to_string(),
        destination: b.destination.clone(),
        reason,
    };
    let real = std::fs::canonicalize(&b.source).map_err(|e| err(e.to_string()))?;
    if let Some(r) = REFUSED_BIND_SOURCES.iter().find(|r| real.starts_with(r)) {
        return Err(err(format!(
            "{} is below the host's {r}, which a wisp pod never gets (the guest has its own {r}; \
             sharing the host's would expose host processes, devices or kernel settings to the pod)",
            real.display()
        )));
    }
    Ok(real)
}

/// Refuses, before anything is started or mounted, binds whose source is missing or
/// is below the host's `/proc`, `/sys` or `/dev`.
pub fn check_bind_sources(binds: &[SharedBind]) -> Result<(), MountError> {
    binds.iter().try_for_each(|b| checked_source(b).map(drop))
}

/// The mounts of one container, newest last.
#[derive(Debug)]
pub struct ContainerMounts {
    share: Arc<Share>,
    id: String,
    /// (path below the view, mount id), in the order they were made.
    mounted: Vec<(PathBuf, u64)>,
}

impl ContainerMounts {
    pub fn new(share: Arc<Share>, id: &str) -> Self {
        Self { share, id: id.to_string(), mounted: Vec::new() }
    }

    fn mkdir(&self, rel: &Path) -> Result<(), MountError> {
        self.share.skel.mkdir_all(rel, 0o700).map(drop).map_err(|source| MountError::Create {
            path: self.share.skel.path().join(rel).display().to_string(),
            source,
        })
    }

    /// The mount id now visible at `rel` in the view (after a mount there).
    fn record(&mut self, rel: &Path) -> Result<(), String> {
        let fd = self.share.view.open_target(rel).map_err(|e| e.to_string())?;
        let id = hostfs::mount_id(fd.as_fd()).map_err(|e| e.to_string())?;
        self.mounted.push((rel.to_path_buf(), id));
        Ok(())
    }

    /// Mounts the rootfs: containerd's mounts when given, else a bind of `bundle_rootfs`.
    pub fn mount_rootfs(&mut self, rootfs: &[Mount], bundle_rootfs: &Path) -> Result<(), MountError> {
        let rel = Path::new(&self.id).join("rootfs");
        self.mkdir(&rel)?;
        let t = self.share.view.path().join(&rel).display().to_string();
        let err = |reason: String| MountError::Rootfs { target: t.clone(), reason };
        if rootfs.is_empty() {
            let target = self.share.view.open_target(&rel).map_err(|e| err(e.to_string()))?;
            hostfs::bind(bundle_rootfs, target.as_fd(), BindAttrs::all(GUARD), true).map_err(|e| err(e.to_string()))?;
            self.record(&rel).map_err(err)?;
        } else {
            for m in rootfs {
                // Opened anew for each: a second mount stacks on the first's root.
                let target = self.share.view.open_target(&rel).map_err(|e| err(e.to_string()))?;
                mount_one(m, target.as_fd()).map_err(err)?;
                self.record(&rel).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Bind-mounts each of the spec's binds onto the share. Returns, for each read-only
    /// (not recursively read-only) bind with submounts, those the guest must bind on
    /// their own (`BundleSpec::for_guest`).
    pub fn mount_binds(&mut self, binds: &[SharedBind]) -> Result<GuestSubmounts, MountError> {
        let mut submounts = GuestSubmounts::new();
        for b in binds {
            let rel = Path::new(&self.id).join(b.share_name());
            let err = |reason: String| MountError::Bind {
                source_path: b.source.display().to_string(),
                destination: b.destination.clone(),
                reason,
            };
            let real = checked_source(b)?;
            let meta = std::fs::metadata(&real).map_err(|e| err(e.to_string()))?;
            if meta.is_dir() {
                self.mkdir(&rel)?;
            } else {
                let parent = rel.parent().unwrap_or(Path::new(""));
                self.mkdir(parent)?;
                self.share.skel.create_file(&rel, 0o600).map_err(|source| MountError::Create {
                    path: self.share.skel.path().join(&rel).display().to_string(),
                    source,
                })?;
            }
            let target = self.share.view.open_target(&rel).map_err(|e| err(e.to_string()))?;
            let attrs = match b.access {
                Access::ReadWrite => BindAttrs::all(GUARD),
                Access::ReadOnly => BindAttrs { tree: GUARD, top: libc::MOUNT_ATTR_RDONLY },
                Access::RecursiveReadOnly => BindAttrs::all(GUARD | libc::MOUNT_ATTR_RDONLY),
            };
            let id = hostfs::bind(&real, target.as_fd(), attrs, b.recursive).map_err(|e| err(e.to_string()))?;
            self.mounted.push((rel, id));
            if b.access == Access::ReadOnly && b.recursive {
                let entries = mountinfo::read().map_err(|e| err(format!("reading the mount table: {e}")))?;
                let found = guest_submounts(&entries, id);
                if !found.is_empty() {
                    submounts.insert(b.index, found);
                }
            }
        }
        Ok(submounts)
    }

    /// Unmounts what was recorded (newest first; lazily when busy) and removes the
    /// container's directory from the skeleton.
    pub fn unmount_all(&mut self) {
        while let Some((rel, id)) = self.mounted.pop() {
            if let Err(e) = hostfs::unmount(&self.share.view, &rel, Some(id)) {
                log::warn!("{e}");
            }
        }
        if let Err(e) = self.share.skel.remove_tree(Path::new(&self.id)) {
            log::warn!("removing {}: {e}", self.share.skel.path().join(&self.id).display());
        }
    }
}

impl Drop for ContainerMounts {
    fn drop(&mut self) {
        self.unmount_all();
    }
}

/// The mounts below bind `top` (a read-only one) that the guest must mount on their own:
/// each whose read-only flag differs from its parent's. The guest sees the bind as one
/// tree and mounts it read-only; a writable mount below gets a writable bind there (and
/// a read-only one below that a read-only bind again), as the host has them.
fn guest_submounts(entries: &[mountinfo::Entry], top: u64) -> Vec<GuestSubmount> {
    let read_only = |id: u64| if id == top { Some(true) } else { entries.iter().find(|e| e.id == id).map(|e| e.read_only) };
    mountinfo::submounts(entries, top)
        .into_iter()
        .filter(|(rel, e)| !rel.as_os_str().is_empty() && read_only(e.parent) != Some(e.read_only))
        .map(|(rel, e)| GuestSubmount { path: rel, read_only: e.read_only })
        .collect()
}

/// Splits containerd mount options into mount(2) flags and the data string.
fn parse_options(options: &[String]) -> (MsFlags, String) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" | "defaults" => (MsFlags::empty(), MsFlags::empty()),
            other => {
                data.push(other.to_string());
                (MsFlags::empty(), MsFlags::empty())
            }
        };
        flags = (flags | set) & !clear;
    }
    (flags, data.join(","))
}

/// One of containerd's rootfs mounts (overlay snapshot, or a bind for native
/// snapshots), done in this process: no fork, so no reaper is involved.
fn mount_one(m: &Mount, target: std::os::fd::BorrowedFd<'_>) -> Result<(), String> {
    let (flags, data) = parse_options(&m.options);
    if data.len() >= 4096 {
        return Err(format!("mount options of {} bytes exceed a page; too many image layers", data.len()));
    }
    if flags.contains(MsFlags::MS_BIND) {
        let attrs = BindAttrs::all(if flags.contains(MsFlags::MS_RDONLY) { GUARD | libc::MOUNT_ATTR_RDONLY } else { GUARD });
        hostfs::bind(Path::new(&m.source), target, attrs, flags.contains(MsFlags::MS_REC))
            .map_err(|e| e.to_string())?;
        return Ok(());
    }
    let source = (!m.source.is_empty()).then_some(m.source.as_str());
    let data = (!data.is_empty()).then_some(data.as_str());
    hostfs::mount_fs(source, target, &m.type_, flags, data)
        .map_err(|e| format!("{} mount of {:?}: {e}", m.type_, m.source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let o = |v: &[&str]| parse_options(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let (f, d) = o(&["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"]);
        assert!(f.is_empty());
        assert_eq!(d, "index=off,workdir=/w,upperdir=/u,lowerdir=/l1:/l2");
        let (f, d) = o(&["rbind", "ro", "nosuid"]);
        assert_eq!(f, MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert!(d.is_empty());
        let (f, _) = o(&["ro", "rw"]);
        assert!(!f.contains(MsFlags::MS_RDONLY));
    }

    fn share() -> (tempfile::TempDir, Arc<Share>) {
        let d = tempfile::tempdir().unwrap();
        let skel = hostfs::Dir::open_trusted(d.path()).unwrap();
        let view = hostfs::Dir::open_trusted(d.path()).unwrap();
        (d, Arc::new(Share { skel, view }))
    }

    #[test]
    fn the_guest_binds_each_submount_whose_flag_differs_from_its_parents() {
        let info = "\
36 1 0:32 / / rw - ext4 /dev/vda rw
41 36 0:41 / /s/c1/mounts/3 rw,nosuid,nodev - ext4 /dev/vda rw
44 41 0:44 / /s/c1/mounts/3/rw rw,nosuid,nodev - tmpfs none rw
45 44 0:45 / /s/c1/mounts/3/rw/ro ro,nosuid,nodev - tmpfs none rw
46 44 0:46 / /s/c1/mounts/3/rw/rw2 rw,nosuid,nodev - tmpfs none rw
47 41 0:47 / /s/c1/mounts/3/ro ro,nosuid,nodev - tmpfs none rw
48 36 0:48 / /s/c1/mounts/4 rw,nosuid,nodev - tmpfs none rw
";
        // `top` counts as read-only whatever its line says: only read-only binds are asked.
        let subs = guest_submounts(&mountinfo::parse(info), 41);
        assert_eq!(
            subs,
            vec![
                GuestSubmount { path: "rw".into(), read_only: false },
                GuestSubmount { path: "rw/ro".into(), read_only: true },
            ]
        );
        assert!(guest_submounts(&mountinfo::parse(info), 48).is_empty());
    }

    /// Needs root (mounts): an `ro` bind is read-only at its top, its writable submount
    /// stays writable and is reported for the guest; an `rro` bind is read-only below too.
    #[test]
    #[ignore = "needs root (bind mounts)"]
    fn read_only_binds_leave_submounts_writable_and_rro_binds_do_not() {
        let (d, share) = share();
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("sub")).unwrap();
        let sub = src.path().join("sub");
        nix::mount::mount(Some("tmpfs"), &sub, Some("tmpfs"), MsFlags::empty(), None::<&str>).unwrap();
        let bind = |index, access| SharedBind {
            index,
            source: src.path().into(),
            destination: "/v".into(),
            access,
            recursive: true,
        };
        let mut m = ContainerMounts::new(share, "c1");
        let subs = m.mount_binds(&[bind(0, Access::ReadOnly), bind(1, Access::RecursiveReadOnly)]).unwrap();
        let write = |p: &str| std::fs::write(d.path().join("c1/mounts").join(p), b"x").map_err(|e| e.raw_os_error());
        assert_eq!(write("0/f"), Err(Some(libc::EROFS)), "the ro bind's top is writable");
        assert_eq!(write("0/sub/f"), Ok(()), "the ro bind's submount is not writable");
        assert_eq!(write("1/sub/g"), Err(Some(libc::EROFS)), "the rro bind's submount is writable");
        assert_eq!(subs, GuestSubmounts::from([(0, vec![GuestSubmount { path: "sub".into(), read_only: false }])]));
        m.unmount_all();
        nix::mount::umount2(&sub, nix::mount::MntFlags::MNT_DETACH).unwrap();
        assert!(!d.path().join("c1").exists());
    }

    #[test]
    fn removes_plain_trees() {
        let (d, share) = share();
        let c = d.path().join("c1");
        std::fs::create_dir_all(c.join("mounts/3")).unwrap();
        std::fs::write(c.join("mounts/1"), b"").unwrap();
        let mut m = ContainerMounts::new(share, "c1");
        m.unmount_all();
        assert!(!c.exists());
    }

    #[test]
    fn missing_bind_source_names_it() {
        let (_d, share) = share();
        let mut m = ContainerMounts::new(share, "c1");
        let b =
            SharedBind { index: 0, source: "/nonexistent/vol".into(), destination: "/data".into(), access: Access::ReadWrite, recursive: true };
        let e = m.mount_binds(&[b]).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/vol") && e.contains("/data"), "{e}");
    }

    #[test]
    fn host_proc_sys_and_dev_are_refused_by_name() {
        let (d, share) = share();
        let mut m = ContainerMounts::new(share, "c1");
        let link = d.path().join("sneaky");
        std::os::unix::fs::symlink("/proc/self", &link).unwrap();
        for (src, root) in
            [("/proc", "/proc"), ("/sys/kernel", "/sys"), ("/dev/null", "/dev"), (link.to_str().unwrap(), "/proc")]
        {
            let b = SharedBind { index: 0, source: src.into(), destination: "/x".into(), access: Access::ReadOnly, recursive: true };
            let e = m.mount_binds(&[b]).unwrap_err().to_string();
            assert!(e.contains(src) && e.contains("/x") && e.contains(&format!("host's {root}")), "{e}");
        }
        assert!(m.mounted.is_empty() && !d.path().join("c1/mounts").exists());
    }
}
