//! Cleanup that does not rely on the shim's memory: used when a sandbox directory is
//! removed and by `delete` after a shim died (containerd then runs
//! `containerd-shim-wisp-v2 delete` in the bundle directory).

use std::path::Path;

/// Unmounts every mount below `dir` (deepest first; lazily when busy). Each is opened
/// from `dir` without following a symlink (`hostfs`), so a path in the mount table that
/// a guest redirected is skipped with a warning, never followed.
pub fn unmount_below(dir: &Path) {
    let Ok(entries) = crate::mountinfo::read() else { return };
    let below = crate::mountinfo::mount_points_below(&entries, dir);
    if below.is_empty() {
        return;
    }
    let root = match crate::hostfs::Dir::open_trusted(dir) {
        Ok(d) => d,
        Err(e) => return log::warn!("unmounting below {}: {e}", dir.display()),
    };
    for m in below {
        let Ok(rel) = m.strip_prefix(dir) else { continue };
        if rel.as_os_str().is_empty() {
            // `dir` itself a mount point: not ours to take down.
            continue;
        }
        if let Err(e) = crate::hostfs::unmount(&root, rel, None) {
            log::warn!("unmounting {}: {e}", m.display());
            continue;
        }
        // Mounts stacked on the same point (a rootfs of several mounts) show as one path.
        for _ in 0..16 {
            if crate::hostfs::unmount(&root, rel, None).is_err() {
                break;
            }
        }
    }
}

/// After a dead shim: kill its VMM, unmount and remove the sandbox dir. The VMM is
/// found by the pid and start time its shim recorded (`vmm.pid`) and signalled through
/// a pidfd after its identity is checked (`pidfd::kill_recorded`), so a process that
/// reused the pid is left alone. (The VMM normally died with its shim already: its
/// parent-death signal is SIGKILL.)
pub fn cleanup_sandbox_dir(dir: &Path) {
    if let Ok(text) = std::fs::read_to_string(dir.join("vmm.pid")) {
        match crate::pidfd::VmmRecord::parse(&text) {
            Some(record) => match crate::pidfd::kill_recorded(record, "wisp-vmm") {
                Ok(crate::pidfd::KillOutcome::Killed) => log::info!("killed the leftover wisp-vmm[{}]", record.pid),
                Ok(crate::pidfd::KillOutcome::Gone) => {}
                Ok(crate::pidfd::KillOutcome::NotTheRecorded(why)) => {
                    log::info!("not killing pid {}: not the recorded wisp-vmm ({why})", record.pid)
                }
                Err(e) => log::warn!("cannot check or kill the leftover wisp-vmm[{}]: {e}", record.pid),
            },
            None => log::warn!(
                "{}: not a pid and start time; no VMM is killed by it",
                dir.join("vmm.pid").display()
            ),
        }
    }
    remove_state_dir(dir);
}

/// Removes a sandbox state directory: everything below should already be unmounted
/// (`ContainerMounts`); anything still mounted is unmounted first (found in the mount
/// table, opened without following a symlink), and the removal never follows a symlink
/// nor enters a mount, so no file on a volume or elsewhere on the host is ever deleted
/// through it.
pub fn remove_state_dir(dir: &Path) {
    unmount_below(dir);
    let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else { return };
    let removed = crate::hostfs::Dir::open_trusted(parent).and_then(|p| p.remove_tree(Path::new(name)));
    if let Err(e) = removed {
        if e.kind() != std::io::ErrorKind::NotFound {
            log::warn!("removing {}: {e}", dir.display());
        }
    }
}
