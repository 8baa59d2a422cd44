//! The serving shim's own mount namespace.
//!
//! Before it starts a thread, the shim that serves a pod (not `start`, `delete` or
//! `-info`) moves into a mount namespace of its own, a slave of the host's. Everything
//! it mounts for the pod (the share's view, each container's rootfs and volumes, a
//! network namespace it makes) then exists there and in the jailed wisp-vmm's namespace
//! (made from it), never in the host's:
//!
//! - no host user or process sees the pod's files through the state directory;
//! - a host directory a volume came from can be unmounted and removed while the pod runs
//!   (removing a mount point detaches the copies other namespaces hold, as for runc's
//!   containers, which live in namespaces of their own; in the host's own namespace the
//!   share's copy made the removal fail with EBUSY);
//! - the mounts end with the shim and the VMM, however they end.
//!
//! As a slave, the namespace still receives what the host mounts later (a volume's
//! submount made after the pod started) where the host's mounts are shared, as systemd
//! and Kubernetes nodes have them; nothing the shim mounts propagates back.

use std::io;

/// Whether the shim's arguments are those of the serving process: containerd's
/// `start` runs the binary again without an action, and that process serves the pod.
pub fn is_serving(args: &[String]) -> bool {
    matches!(containerd_shim::parse(args), Ok(f) if f.action.is_empty() && !f.version)
}

/// unshare(CLONE_NEWNS) and make every mount a slave. Must run before any thread starts
/// (a thread's mount namespace is the process's).
pub fn enter_own() -> io::Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("unsharing the mount namespace: {e}")))?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_SLAVE | nix::mount::MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("making the host's mounts slaves: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_the_serving_process_is_serving() {
        assert!(is_serving(&args(&[
            "-namespace",
            "k8s.io",
            "-id",
            "p1",
            "-address",
            "/run/containerd/containerd.sock"
        ])));
        assert!(!is_serving(&args(&["-namespace", "k8s.io", "-id", "p1", "start"])));
        assert!(!is_serving(&args(&["-namespace", "k8s.io", "-id", "p1", "delete"])));
        assert!(!is_serving(&args(&["-v"])));
    }
}
