//! Cleanup that does not rely on the shim's memory: used when a sandbox directory is
//! removed and by `delete` after a shim died (containerd then runs
//! `containerd-shim-wisp-v2 delete` in the bundle directory).

use std::path::{Path, PathBuf};

/// Mount points at or below `dir`, deepest first, from /proc/self/mountinfo.
pub fn mounts_below(dir: &Path, mountinfo: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let code = std::str::from_utf8(&b[i + 1..i + 4]).ok().and_then(|o| u8::from_str_radix(o, 8).ok());
            if let Some(v) = code {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts every mount below `dir` (deepest first; lazily when busy). Each is opened
/// from `dir` without following a symlink (`hostfs`), so a path in the mount table that
/// a guest redirected is skipped with a warning, never followed.
pub fn unmount_below(dir: &Path) {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let below = mounts_below(dir, &info);
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

/// After a dead shim: kill its VMM (pid file), unmount and remove the sandbox dir.
pub fn cleanup_sandbox_dir(dir: &Path) {
    if let Ok(pid) = std::fs::read_to_string(dir.join("vmm.pid")) {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            if is_vmm(pid) {
                // SAFETY: kill(2); the pid was checked to be a wisp-vmm process.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    crate::sandbox::remove_state_dir(dir);
}

fn is_vmm(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "wisp-vmm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mounts_below_deepest_first() {
        let info = "\
36 1 0:32 / / rw - ext4 /dev/vda rw
40 36 0:40 / /run/wisp/sb1/shared/c1/rootfs rw - overlay overlay rw
41 40 0:41 / /run/wisp/sb1/shared/c1/mounts/3 rw - ext4 /dev/vda rw
42 36 0:42 / /run/wisp/sb10/shared/x rw - tmpfs t rw
43 36 0:43 / /run/wisp/sb1/shared/with\\040space rw - tmpfs t rw
";
        let m = mounts_below(Path::new("/run/wisp/sb1"), info);
        assert_eq!(
            m,
            vec![
                PathBuf::from("/run/wisp/sb1/shared/c1/mounts/3"),
                PathBuf::from("/run/wisp/sb1/shared/c1/rootfs"),
                PathBuf::from("/run/wisp/sb1/shared/with space"),
            ]
        );
    }
}
