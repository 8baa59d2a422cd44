//! The host cgroup a pod's wisp-vmm runs in: the sandbox container's
//! `linux.cgroupsPath`, a leaf below the pod's cgroup, so that guest RAM and vCPU time
//! count against the pod (what Kubernetes' RuntimeClass overhead expects) and not
//! against containerd. cgroup v2 only; both path forms containerd writes are understood:
//! cgroupfs (`/kubepods/besteffort/pod<uid>/<id>`) and systemd
//! (`kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`, expanded the way runc's
//! systemd driver names the directories).

use std::fs::File;
use std::path::{Component, Path, PathBuf};

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("linux.cgroupsPath {path:?}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("cgroup {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// The directory below `root` that `cgroups_path` names.
pub fn resolve(root: &Path, cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let invalid = |reason: &str| CgroupError::Invalid { path: cgroups_path.into(), reason: reason.into() };
    let rel = if let Some((slice, rest)) = cgroups_path.split_once(':') {
        let (prefix, name) = rest.split_once(':').ok_or_else(|| invalid("systemd form is slice:prefix:name"))?;
        if name.is_empty() || name.contains('/') || prefix.contains('/') || slice.contains('/') {
            return Err(invalid("systemd form is slice:prefix:name, without '/'"));
        }
        let mut p = expand_slice(if slice.is_empty() { "system.slice" } else { slice }).ok_or_else(|| invalid("not a valid slice name"))?;
        p.push(if prefix.is_empty() { format!("{name}.scope") } else { format!("{prefix}-{name}.scope") });
        p
    } else {
        PathBuf::from(cgroups_path.trim_matches('/'))
    };
    // Checked on the text: Path::components() would quietly drop a "." segment.
    let text = rel.to_string_lossy();
    let segments_ok = text.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..");
    if !segments_ok || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(invalid("must name a cgroup below the root, without '.' or '..'"));
    }
    Ok(root.join(rel))
}

/// `a-b-c.slice` -> `a.slice/a-b.slice/a-b-c.slice` (systemd's slice nesting).
fn expand_slice(slice: &str) -> Option<PathBuf> {
    let base = slice.strip_suffix(".slice")?;
    if base == "-" {
        return Some(PathBuf::new());
    }
    if base.is_empty() || base.starts_with('-') || base.ends_with('-') || base.contains("--") {
        return None;
    }
    let mut p = PathBuf::new();
    let mut prefix = String::new();
    for part in base.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        p.push(format!("{prefix}.slice"));
    }
    Some(p)
}

/// A leaf cgroup for the VMM; removed on drop if this created it (it must be empty by
/// then: the VMM has exited).
pub struct VmmCgroup {
    pub dir: PathBuf,
    created: bool,
}

impl VmmCgroup {
    /// Creates (or reuses) the cgroup `cgroups_path` names; None when the host has no
    /// cgroup v2 hierarchy at `root`.
    pub fn create(root: &Path, cgroups_path: &str) -> Result<Option<Self>, CgroupError> {
        if !root.join("cgroup.controllers").exists() {
            log::warn!("{} is not a cgroup v2 hierarchy: the VMM stays in the shim's cgroup", root.display());
            return Ok(None);
        }
        let dir = resolve(root, cgroups_path)?;
        let created = !dir.exists();
        std::fs::create_dir_all(&dir).map_err(|source| CgroupError::Io { path: dir.display().to_string(), source })?;
        Ok(Some(Self { dir, created }))
    }

    /// `cgroup.procs`, opened for the child to write itself into.
    pub fn procs(&self) -> Result<File, CgroupError> {
        let p = self.dir.join("cgroup.procs");
        File::options().write(true).open(&p).map_err(|source| CgroupError::Io { path: p.display().to_string(), source })
    }
}

impl Drop for VmmCgroup {
    fn drop(&mut self) {
        if self.created {
            if let Err(e) = std::fs::remove_dir(&self.dir) {
                log::warn!("removing cgroup {}: {e}", self.dir.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroupfs_and_systemd_paths() {
        let r = Path::new("/sys/fs/cgroup");
        assert_eq!(resolve(r, "/kubepods/besteffort/pod1/abc").unwrap(), r.join("kubepods/besteffort/pod1/abc"));
        assert_eq!(resolve(r, "/wisp-test/c1").unwrap(), r.join("wisp-test/c1"));
        assert_eq!(
            resolve(r, "kubepods-besteffort-pod1.slice:cri-containerd:abc").unwrap(),
            r.join("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope")
        );
        assert_eq!(resolve(r, ":wisp:x").unwrap(), r.join("system.slice/wisp-x.scope"));
        assert_eq!(resolve(r, "-.slice::x").unwrap(), r.join("x.scope"));
    }

    #[test]
    fn bad_paths_are_refused_by_name() {
        let r = Path::new("/sys/fs/cgroup");
        for bad in ["", "/", "/a/../../etc", "a/./b", "x.slice:p", "bad-.slice:p:n", "a.slice:p/x:n", "notaslice:p:n"] {
            let e = resolve(r, bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }
    }

    #[test]
    fn created_leaves_are_removed_and_existing_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cgroup.controllers"), "memory").unwrap();
        std::fs::create_dir_all(d.path().join("pod/existing")).unwrap();
        let c = VmmCgroup::create(d.path(), "/pod/new").unwrap().unwrap();
        assert!(d.path().join("pod/new").is_dir());
        drop(c);
        assert!(!d.path().join("pod/new").exists());
        drop(VmmCgroup::create(d.path(), "/pod/existing").unwrap().unwrap());
        assert!(d.path().join("pod/existing").is_dir());
        let none = tempfile::tempdir().unwrap();
        assert!(VmmCgroup::create(none.path(), "/x").unwrap().is_none());
    }
}
