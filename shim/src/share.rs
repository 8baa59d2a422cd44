//! A sandbox's share: the directory tree the guest sees through virtio-fs, and the
//! host-only skeleton behind it.
//!
//! ```text
//! <state_dir>/<sandbox>/      0700, root's: no other host user reaches anything below
//!   skel/                     0700, host only: the shim creates each container's
//!                             directory and mount points here (`<cid>/rootfs`,
//!                             `<cid>/mounts/<n>`)
//!   shared/                   a read-only, nosuid, nodev bind of skel/: what wisp-vmm
//!                             exports as the share. The shim mounts each container's
//!                             rootfs and volumes onto their mount points *here*.
//! ```
//!
//! So the guest can write only inside those mounts (a container's writable layer, a
//! read-write volume), never into the share's own directories: it cannot rename a
//! container's directory, plant a symlink where the shim will mount or remove, or fill
//! the host's `/run`. The mounts exist only under `shared/` (a mount is attached to one
//! mount's dentry): `skel/` stays a tree of empty directories. Everything is done
//! through `hostfs` (fd-relative, no symlink followed, no mount crossed) all the same.

use std::io;
use std::os::fd::AsFd;
use std::path::Path;

use crate::hostfs::{self, Dir};

/// Host-only skeleton, below the sandbox directory.
pub const SKEL: &str = "skel";
/// The guest's read-only view of it, below the sandbox directory.
pub const VIEW: &str = "shared";

#[derive(Debug)]
pub struct Share {
    pub skel: Dir,
    pub view: Dir,
}

impl Share {
    /// Lays out the share in `sandbox_dir` (which the caller created, mode 0700). On
    /// failure, what was made is left for the caller's removal of the sandbox directory.
    pub fn create(sandbox_dir: &Path) -> io::Result<Share> {
        let sandbox = Dir::open_trusted(sandbox_dir)?;
        let skel = sandbox.mkdir_all(Path::new(SKEL), 0o700)?;
        sandbox.mkdir_all(Path::new(VIEW), 0o700)?;
        let target = sandbox.open_target(Path::new(VIEW))?;
        let attrs = hostfs::BindAttrs::all(hostfs::GUARD | libc::MOUNT_ATTR_RDONLY);
        hostfs::bind_fd(skel.as_fd(), target.as_fd(), attrs, false)
            .map_err(|e| io::Error::new(e.kind(), format!("making the share's read-only view: {e}")))?;
        let view = sandbox.open_mounted_dir(Path::new(VIEW))?;
        // A peer group of its own, so that a jailed wisp-vmm, whose mount namespace
        // holds a slave copy of the view, sees the containers' mounts made here later
        // (and nothing it does reaches back).
        nix::mount::mount(None::<&str>, &hostfs::fd_path(view.as_fd()), None::<&str>, nix::mount::MsFlags::MS_SHARED, None::<&str>)
            .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("making the share's view a shared mount: {e}")))?;
        Ok(Share { skel, view })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Needs root (a bind mount).
    #[test]
    #[ignore = "needs root (bind mounts)"]
    fn the_view_is_read_only_nosuid_nodev_and_follows_the_skeleton() {
        let t = tempfile::tempdir().unwrap();
        let sb = t.path().join("sb");
        hostfs::create_dir_all_mode(&sb, 0o700).unwrap();
        let share = Share::create(&sb).unwrap();
        for d in [SKEL, VIEW] {
            let m = std::fs::metadata(sb.join(d)).unwrap().permissions().mode();
            assert_eq!(m & 0o7777, 0o700, "{d}");
        }
        share.skel.mkdir_all(Path::new("c1/rootfs"), 0o700).unwrap();
        assert!(sb.join("shared/c1/rootfs").is_dir(), "the view does not show the skeleton");
        let e = std::fs::write(sb.join("shared/fill"), b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        let e = std::fs::rename(sb.join("shared/c1"), sb.join("shared/c2")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        let e = std::os::unix::fs::symlink("/etc", sb.join("shared/c1/evil")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EROFS));
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info.lines().find(|l| l.split(' ').nth(4) == Some(&sb.join(VIEW).display().to_string())).unwrap();
        let opts: Vec<&str> = line.split(' ').nth(5).unwrap().split(',').collect();
        assert!(["ro", "nosuid", "nodev"].iter().all(|o| opts.contains(o)), "{line}");
        // A mount made on the view's mount point is writable (a container's layer),
        // and the skeleton's directory under it stays empty.
        let target = share.view.open_target(Path::new("c1/rootfs")).unwrap();
        hostfs::mount_fs(Some("tmpfs"), target.as_fd(), "tmpfs", nix::mount::MsFlags::empty(), None).unwrap();
        std::fs::write(sb.join("shared/c1/rootfs/f"), b"x").unwrap();
        assert!(!sb.join("skel/c1/rootfs/f").exists());
        drop(share);
        crate::cleanup::remove_state_dir(&sb);
        assert!(!sb.exists());
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!info.contains(&sb.display().to_string()), "mounts left");
    }
}
