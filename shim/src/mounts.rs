//! What the shim mounts on the host for a container, and how it all comes down again.
//!
//! The container's directory on the share is `<sandbox state>/shared/<cid>/`: the rootfs
//! (containerd's snapshot mounts) at `rootfs/`, and each bind mount of the spec at
//! `mounts/<n>` (a directory or an empty file as mount point). Read-only binds are
//! remounted read-only so the guest cannot write through them. Every mount is recorded
//! as it is made; `unmount_all` takes them down in reverse order (lazily if busy) and
//! removes the directory, also after a failure halfway through setup.

use std::path::{Path, PathBuf};

use containerd_shim_protos::api::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::spec::SharedBind;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("creating {path}: {source}")]
    Create { path: String, source: std::io::Error },
    #[error("mounting the rootfs at {target}: {reason}")]
    Rootfs { target: String, reason: String },
    #[error("bind-mounting {source_path} for {destination}: {reason}")]
    Bind { source_path: String, destination: String, reason: String },
}

/// The mounts of one container, newest last.
#[derive(Debug, Default)]
pub struct ContainerMounts {
    dir: PathBuf,
    mounted: Vec<PathBuf>,
}

impl ContainerMounts {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, mounted: Vec::new() }
    }

    /// Mounts the rootfs: containerd's mounts when given, else a bind of `bundle_rootfs`.
    pub fn mount_rootfs(&mut self, rootfs: &[Mount], bundle_rootfs: &Path) -> Result<(), MountError> {
        let target = self.dir.join("rootfs");
        mkdir(&target)?;
        let t = target.display().to_string();
        if rootfs.is_empty() {
            bind(bundle_rootfs, &target, false).map_err(|reason| MountError::Rootfs { target: t.clone(), reason })?;
        } else {
            for m in rootfs {
                mount_one(m, &target).map_err(|reason| MountError::Rootfs { target: t.clone(), reason })?;
            }
        }
        self.mounted.push(target);
        Ok(())
    }

    /// Bind-mounts each of the spec's binds onto the share.
    pub fn mount_binds(&mut self, binds: &[SharedBind]) -> Result<(), MountError> {
        for b in binds {
            let target = self.dir.join(b.share_name());
            let err = |reason: String| MountError::Bind {
                source_path: b.source.display().to_string(),
                destination: b.destination.clone(),
                reason,
            };
            let meta = std::fs::metadata(&b.source).map_err(|e| err(e.to_string()))?;
            if meta.is_dir() {
                mkdir(&target)?;
            } else {
                if let Some(parent) = target.parent() {
                    mkdir(parent)?;
                }
                std::fs::write(&target, b"").map_err(|source| MountError::Create { path: target.display().to_string(), source })?;
            }
            bind(&b.source, &target, b.read_only).map_err(err)?;
            self.mounted.push(target);
        }
        Ok(())
    }

    /// Unmounts everything (reverse order; lazily when busy) and removes the directory.
    pub fn unmount_all(&mut self) {
        while let Some(m) = self.mounted.pop() {
            if let Err(e) = umount2(&m, MntFlags::empty()) {
                log::warn!("unmounting {}: {e}; detaching it lazily", m.display());
                let _ = umount2(&m, MntFlags::MNT_DETACH);
            }
        }
        if self.dir.exists() {
            if let Err(e) = remove_tree_same_fs(&self.dir) {
                log::warn!("removing {}: {e}", self.dir.display());
            }
        }
    }
}

impl Drop for ContainerMounts {
    fn drop(&mut self) {
        self.unmount_all();
    }
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
fn mount_one(m: &Mount, target: &Path) -> Result<(), String> {
    let (flags, data) = parse_options(&m.options);
    if data.len() >= 4096 {
        return Err(format!("mount options of {} bytes exceed a page; too many image layers", data.len()));
    }
    let fs_type = (!m.type_.is_empty() && m.type_ != "bind").then_some(m.type_.as_str());
    let source = (!m.source.is_empty()).then_some(m.source.as_str());
    let data = (!data.is_empty()).then_some(data.as_str());
    let base = flags & !MsFlags::MS_RDONLY;
    let is_bind = flags.contains(MsFlags::MS_BIND);
    mount(source, target, fs_type, if is_bind { base } else { flags }, data).map_err(|e| format!("{} mount of {:?}: {e}", m.type_, m.source))?;
    if is_bind && flags.contains(MsFlags::MS_RDONLY) {
        mount(None::<&str>, target, None::<&str>, base | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY, None::<&str>)
            .map_err(|e| format!("read-only remount of {}: {e}", target.display()))?;
    }
    Ok(())
}

fn mkdir(p: &Path) -> Result<(), MountError> {
    std::fs::create_dir_all(p).map_err(|source| MountError::Create { path: p.display().to_string(), source })
}

fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), String> {
    mount(Some(source), target, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>).map_err(|e| e.to_string())?;
    if read_only {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
            let _ = umount2(target, MntFlags::MNT_DETACH);
            return Err(format!("read-only remount: {e}"));
        }
    }
    Ok(())
}

/// Removes a directory tree without crossing into anything still mounted below it
/// (a mount that could not be taken down must not lose its files).
fn remove_tree_same_fs(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::symlink_metadata(dir)?.dev();
    fn walk(p: &Path, dev: u64) -> std::io::Result<()> {
        for entry in std::fs::read_dir(p)? {
            let entry = entry?;
            let meta = std::fs::symlink_metadata(entry.path())?;
            if meta.dev() != dev {
                return Err(std::io::Error::other(format!("{} is still a mount point", entry.path().display())));
            }
            if meta.is_dir() {
                walk(&entry.path(), dev)?;
                std::fs::remove_dir(entry.path())?;
            } else {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }
    walk(dir, dev)?;
    std::fs::remove_dir(dir)
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

    #[test]
    fn removes_plain_trees() {
        let d = tempfile::tempdir().unwrap();
        let c = d.path().join("c1");
        std::fs::create_dir_all(c.join("mounts/3")).unwrap();
        std::fs::write(c.join("mounts/1"), b"").unwrap();
        let mut m = ContainerMounts::new(c.clone());
        m.unmount_all();
        assert!(!c.exists());
    }

    #[test]
    fn missing_bind_source_names_it() {
        let d = tempfile::tempdir().unwrap();
        let mut m = ContainerMounts::new(d.path().join("c1"));
        let b = SharedBind { index: 0, source: "/nonexistent/vol".into(), destination: "/data".into(), read_only: false };
        let e = m.mount_binds(&[b]).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/vol") && e.contains("/data"), "{e}");
    }
}
