//! A minimal container root filesystem built from the host's static busybox
//! (Debian `busybox-static`): `/bin/busybox` plus one symlink per applet, `/etc/passwd`
//! and `/etc/group` with `root` and `user` (1000), and the usual empty mount points.
//! Each call makes a fresh copy in its own temporary directory, removed on drop.

use std::path::Path;

use anyhow::{bail, Context};

/// Where the static busybox is expected on the host.
pub const HOST_BUSYBOX: &str = "/bin/busybox";

/// Why a test needing the busybox rootfs cannot run here, if it cannot.
pub fn need_busybox() -> Option<String> {
    (!Path::new(HOST_BUSYBOX).is_file()).then(|| format!("needs {HOST_BUSYBOX} (Debian package busybox-static)"))
}

/// Builds a busybox rootfs in a new temporary directory.
pub fn busybox_rootfs() -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("wisp-rootfs-").tempdir().context("creating a temporary rootfs dir")?;
    build_busybox_rootfs(dir.path())?;
    Ok(dir)
}

/// Fills `root` with a busybox rootfs.
pub fn build_busybox_rootfs(root: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{symlink, PermissionsExt};
    for d in
        ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "home/user", "run", "var"]
    {
        std::fs::create_dir_all(root.join(d)).with_context(|| format!("creating {d} in the rootfs"))?;
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    std::fs::copy(HOST_BUSYBOX, root.join("bin/busybox")).with_context(|| format!("copying {HOST_BUSYBOX}"))?;
    let out = std::process::Command::new(HOST_BUSYBOX).arg("--list").output().context("running busybox --list")?;
    if !out.status.success() {
        bail!("busybox --list failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    for applet in
        String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|a| !a.is_empty() && *a != "busybox")
    {
        let link = root.join("bin").join(applet);
        if !link.exists() {
            symlink("busybox", &link).with_context(|| format!("linking applet {applet}"))?;
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    )?;
    std::fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n")?;
    std::fs::write(root.join("etc/hostname"), "busybox\n")?;
    Ok(())
}
