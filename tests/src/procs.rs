//! wisp's processes and mounts on the test host, read from /proc: which VMMs and shims
//! run for which pod, and what a leftover process is doing (for leak checks and
//! failure reports).

use std::path::{Path, PathBuf};

use wisp_shim::mountinfo::{self, Entry};

/// Where the shim keeps each pod's state (sockets, logs, mounts): `<STATE_DIR>/<sid>/`.
pub const STATE_DIR: &str = "/run/wisp";

/// The VM templates' directory below `STATE_DIR` (the shim's `template.rs`): kept
/// across pods by design, one template per VM shape.
pub const TEMPLATES_DIR: &str = "templates";

/// The sandbox directories in `STATE_DIR`: every entry but the templates' directory.
pub fn sandbox_dirs() -> Vec<PathBuf> {
    std::fs::read_dir(STATE_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name() != TEMPLATES_DIR)
        .map(|e| e.path())
        .collect()
}

/// Live processes (zombies excluded) running `prog` whose arguments satisfy `pred`.
pub fn processes(prog: &str, pred: impl Fn(&[String]) -> bool) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let Some(argv0) = args.first() else { continue };
        if Path::new(argv0).file_name().is_none_or(|n| n != prog) || !pred(&args) {
            continue;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')) {
            continue;
        }
        out.push(pid);
    }
    out
}

/// The wisp-vmm processes of a pod (their sockets live in its state directory).
pub fn vmm_pids(sid: &str) -> Vec<u32> {
    let dir = format!("{STATE_DIR}/{sid}/");
    processes("wisp-vmm", |args| args.iter().any(|a| a.contains(&dir)))
}

/// Waits up to `timeout` until nothing of pod `sid`'s VM is left: no wisp-vmm, no shim,
/// no mount below its state directory, no state directory (teardown goes on after the
/// call that asked for it returns). Else says what is left.
pub fn wait_pod_gone(sid: &str, timeout: std::time::Duration) -> Result<(), String> {
    let dir = Path::new(STATE_DIR).join(sid);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let (vmms, shims, mounts) = (vmm_pids(sid), shim_pids(sid), mounts_under(&[&dir]));
        if vmms.is_empty() && shims.is_empty() && mounts.is_empty() && !dir.exists() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "pod {sid} left behind: wisp-vmm {vmms:?}, shim {shims:?}, mounts {mounts:?}, dir exists: {}",
                dir.exists()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

pub fn all_vmm_pids() -> Vec<u32> {
    processes("wisp-vmm", |_| true)
}

/// The shim serving a pod: started with `-id <sandbox id>` (the first container's id).
pub fn shim_pids(sid: &str) -> Vec<u32> {
    processes("containerd-shim-wisp-v2", |args| args.windows(2).any(|w| w[0] == "-id" && w[1] == sid))
}

pub fn all_shim_pids() -> Vec<u32> {
    processes("containerd-shim-wisp-v2", |_| true)
}

pub fn parent(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok())
}

/// A process for a failure report: command line, state, and where each thread waits.
pub fn describe(pid: u32) -> String {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let cmdline = std::fs::read(proc.join("cmdline")).unwrap_or_default();
    let mut out = format!("pid {pid}: {}\n", String::from_utf8_lossy(&cmdline).replace('\0', " "));
    let status = std::fs::read_to_string(proc.join("status")).unwrap_or_default();
    for l in status.lines().filter(|l| l.starts_with("State:") || l.starts_with("PPid:")) {
        out += &format!("  {l}\n");
    }
    for t in std::fs::read_dir(proc.join("task")).into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
        let stack = std::fs::read_to_string(t.path().join("stack")).unwrap_or_default();
        let top: Vec<&str> = stack.lines().take(4).collect();
        out += &format!("  thread {:?} {}: wchan {wchan} {}\n", t.file_name(), comm.trim(), top.join(" < "));
    }
    out
}

/// Mount points at or below any of `dirs`, in this process's mount namespace (the
/// host's).
pub fn mounts_under(dirs: &[&Path]) -> Vec<String> {
    mounts_in("self", dirs).into_iter().map(|m| m.mount_point.to_string_lossy().into_owned()).collect()
}

/// The mounts at or below any of `dirs`, as process `pid` ("self" or a number) sees
/// them, in its table's order: the shim's mountinfo parser (escapes decoded; the
/// per-mount options in `Entry::options`, `ro` also as `Entry::read_only`).
pub fn mounts_in(pid: impl std::fmt::Display, dirs: &[&Path]) -> Vec<Entry> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    mountinfo::parse(&info).into_iter().filter(|m| dirs.iter().any(|d| m.mount_point.starts_with(d))).collect()
}

/// The shim serving pod `sid` (not a passing `start` or `delete` call of the binary).
/// The pod's mounts (the share, rootfs, volumes) exist only in its mount namespace.
pub fn serving_shim(sid: &str) -> anyhow::Result<u32> {
    let pids: Vec<u32> = processes("containerd-shim-wisp-v2", |args| {
        args.windows(2).any(|w| w[0] == "-id" && w[1] == sid) && !args.iter().any(|a| a == "start" || a == "delete")
    });
    match pids[..] {
        [pid] => Ok(pid),
        _ => anyhow::bail!("pod {sid}: serving shim processes {pids:?}, want one"),
    }
}

/// `path` (absolute) as process `pid` sees it: through its root, in its mount namespace.
pub fn in_ns_of(pid: u32, path: &Path) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path))
}

/// The running kernel's release (`uname -r`).
pub fn host_kernel() -> anyhow::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_this_test_process_and_its_parent() {
        let me = std::process::id();
        let exe = std::env::current_exe().unwrap();
        let name = exe.file_name().unwrap().to_string_lossy().into_owned();
        assert!(processes(&name, |_| true).contains(&me));
        assert!(processes(&name, |_| false).is_empty());
        assert!(parent(me).is_some());
        assert!(describe(me).starts_with(&format!("pid {me}: ")));
        assert!(mounts_under(&[Path::new("/proc")]).iter().any(|m| m == "/proc"));
        // The per-mount options come along: each mount is either rw or ro.
        let proc = mounts_in(me, &[Path::new("/proc")]);
        let p = proc.iter().find(|m| m.mount_point == Path::new("/proc")).expect("/proc in the mount table");
        assert!(p.options.iter().any(|o| o == if p.read_only { "ro" } else { "rw" }), "{p:?}");
    }
}
