//! A hostile guest, end to end (emulated KVM host, containerd + ctr, the real shim, VMM,
//! guest kernel and agent): from guest root, the attacks of the isolation issue, and
//! checks that the host is unharmed.
//!
//! Guest root is a `--privileged` wisp container that mounts the pod's virtio-fs tag
//! itself (`mount -t virtiofs wisp /mnt/share`): what a container escape inside the
//! guest, or a compromised guest kernel, gives. Each attack's steps print their result
//! and the case checks that they failed *for the reason the defence gives* (a read-only
//! share skeleton), that the share itself was reachable (so a failure cannot come from
//! a share that was never mounted), and what the host looks like afterwards.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use wisp_shim::mountinfo::Entry;
use wisp_tests::containerd::need_containerd;
use wisp_tests::ctr::{env, need_artifacts, Env, Run, RUNTIME};
use wisp_tests::harness::{need_full_kvm, need_root, CaseResult, Outcome, Suite};
use wisp_tests::{ensure_that, skip_unless};
use wisp_tests::procs::{in_ns_of, mounts_in, serving_shim};

macro_rules! skip_unless_ready {
    () => {
        skip_unless!(need_root(), need_containerd(), need_artifacts(), need_full_kvm())
    };
}

/// Mounts the pod's share in the guest, as guest root can; every attack script starts so.
const MOUNT_SHARE: &str =
    "mkdir -p /mnt/share && mount -t virtiofs wisp /mnt/share || { echo share-mount-failed; exit 90; }; cd /mnt/share";

/// Starts a privileged wisp container `id` that sleeps, with extra `ctr run` flags.
fn start_privileged(e: &Env, id: &str, flags: &[&str]) -> anyhow::Result<()> {
    let mut a = vec!["run", "-d", "--privileged", "--runtime", RUNTIME];
    a.extend_from_slice(flags);
    a.extend_from_slice(&[e.image.as_str(), id, "sleep", "600"]);
    e.ok(&a)?;
    Ok(())
}

fn mount_tmpfs(at: &Path) -> anyhow::Result<()> {
    let st = Command::new("mount").args(["-t", "tmpfs", "tmpfs"]).arg(at).status()?;
    ensure_that!(st.success(), "mounting a tmpfs at {} failed", at.display());
    Ok(())
}

fn unmount(at: &Path) {
    let _ = Command::new("umount").arg("-l").arg(at).status();
}

/// Host mounts whose mount point is `p` or below it, in the host's mount namespace.
fn mounts_at_or_below(p: &Path) -> anyhow::Result<Vec<Entry>> {
    Ok(mounts_in("self", &[p]))
}

/// Runs `argv` as user nobody (uid/gid 65534, no groups) in the mount namespace of
/// process `pid` (the pod's shim, where the pod's mounts are): what a host user could do
/// were the mounts in the host's namespace.
fn as_nobody_in_ns_of(pid: u32, argv: &[&str]) -> anyhow::Result<Run> {
    let out = Command::new("nsenter")
        .arg(format!("--mount=/proc/{pid}/ns/mnt"))
        .args(["--", "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(argv)
        .output()?;
    Ok(Run::from_output(out))
}

/// A step the script printed as `name=STATUS`: its exit status.
fn step(r: &Run, name: &str) -> Option<i32> {
    r.stdout.lines().find_map(|l| l.strip_prefix(&format!("{name}="))).and_then(|v| v.trim().parse().ok())
}

/// Attacks 1, 2 and 4 of the issue, and the planted next container: guest root renames
/// its container's directory away and plants `rootfs` -> a host mount point (the old
/// shim unmounted it at delete), replaces the directory with a symlink to a host
/// directory on the state dir's filesystem (the old shim deleted its files), writes
/// 8 MiB into the share root (into the host's /run), and prepares a directory and a
/// symlink under the name the next container would get. All must fail with EROFS; the
/// container's own writable layer must stay writable; after delete the host's mount and
/// files are intact and nothing of wisp is left.
fn teardown_follows_nothing_the_guest_planted() -> CaseResult {
    skip_unless_ready!();
    let e = env()?;
    let victim_mnt = tempfile::Builder::new().prefix("wisp-victim-mnt-").tempdir()?;
    mount_tmpfs(victim_mnt.path())?;
    std::fs::write(victim_mnt.path().join("keep"), "host mount content\n")?;
    // On the same filesystem as the state directory (/run), where a tree removal that
    // follows a symlink would reach.
    let victim_dir = PathBuf::from(format!("/run/wisp-victim-{}", std::process::id()));
    std::fs::create_dir_all(victim_dir.join("sub"))?;
    std::fs::write(victim_dir.join("precious"), "host file\n")?;
    std::fs::write(victim_dir.join("sub/precious"), "host file\n")?;
    let result = (|| -> anyhow::Result<()> {
        start_privileged(&e, "hostile", &[])?;
        let (vm, vd) = (victim_mnt.path().display(), victim_dir.display());
        let script = format!(
            "{MOUNT_SHARE}
            echo own-layer > hostile/rootfs/own-layer; echo own_layer=$?
            mv hostile hostile.away; echo rename=$?
            ln -s {vd} hostile; echo symlink_dir=$?
            ln -s {vm} hostile/rootfs.x; echo symlink_rootfs=$?
            dd if=/dev/zero of=/mnt/share/fill bs=1M count=8; echo fill=$?
            mkdir next; echo next_mkdir=$?
            ln -s {vm} next-rootfs; echo next_symlink=$?
            ln -s {vd} hostile/rootfs/planted-in-layer; echo layer_symlink=$?
            ls -la /mnt/share /mnt/share/hostile"
        );
        let r = e.exec("hostile", "attack", &script)?;
        ensure_that!(!r.stdout.contains("share-mount-failed"), "guest root could not mount the share: {}", r.stderr);
        ensure_that!(
            step(&r, "own_layer") == Some(0),
            "the container's own layer is not writable: {}\n{}",
            r.stdout,
            r.stderr
        );
        for s in ["rename", "symlink_dir", "symlink_rootfs", "fill", "next_mkdir", "next_symlink"] {
            ensure_that!(step(&r, s).is_some_and(|c| c != 0), "attack step {s} succeeded:\n{}\n{}", r.stdout, r.stderr);
        }
        let erofs = r.stderr.lines().filter(|l| l.contains("Read-only file system")).count();
        ensure_that!(erofs >= 6, "only {erofs} of the 6 attack steps failed on the read-only skeleton:\n{}", r.stderr);
        // Nothing the guest wrote reached the state directory outside its layer. The
        // share's mounts are in the shim's mount namespace: looked at from there.
        let sb = Path::new("/run/wisp/hostile");
        let shim = serving_shim("hostile")?;
        let skel: Vec<String> = std::fs::read_dir(sb.join("skel"))?
            .filter_map(Result::ok)
            .map(|d| d.file_name().to_string_lossy().into_owned())
            .collect();
        ensure_that!(skel == ["hostile"], "the share skeleton holds {skel:?}");
        ensure_that!(
            in_ns_of(shim, &sb.join("shared/hostile/rootfs/own-layer")).is_file(),
            "the container's layer is not seen through the shim's namespace: the next check would prove nothing"
        );
        ensure_that!(!in_ns_of(shim, &sb.join("shared/fill")).exists(), "the guest wrote into the share root");
        // The next container of the pod, under the name the guest tried to prepare: its
        // rootfs lands on the share as usual (grouped into the pod like CRI does).
        e.ok(&[
            "run", "-d", "--runtime", RUNTIME,
            "--annotation", "io.kubernetes.cri.sandbox-id=hostile",
            "--annotation", "io.kubernetes.cri.container-type=container",
            &e.image, "next", "sleep", "600",
        ])?;
        let r = e.exec("next", "look", "cat /proc/sys/kernel/random/boot_id; ls /bin/busybox")?;
        ensure_that!(r.code == 0, "the next container does not run: {} {}", r.stdout, r.stderr);
        ensure_that!(
            in_ns_of(shim, &sb.join("shared/next/rootfs/bin/busybox")).exists(),
            "the next container's rootfs is not on the share"
        );
        ensure_that!(mounts_at_or_below(victim_mnt.path())?.len() == 1, "the host mount changed when the next container started");
        e.kill_and_delete("next")?;
        e.kill_and_delete("hostile")
    })();
    if result.is_err() {
        let _ = e.kill_and_delete("next");
        let _ = e.kill_and_delete("hostile");
    }
    let mounted = mounts_at_or_below(victim_mnt.path())?.len();
    let keep = std::fs::read_to_string(victim_mnt.path().join("keep")).unwrap_or_default();
    unmount(victim_mnt.path());
    let files = ["precious", "sub/precious"].iter().filter(|f| victim_dir.join(f).is_file()).count();
    let _ = std::fs::remove_dir_all(&victim_dir);
    result?;
    ensure_that!(
        mounted == 1 && keep == "host mount content\n",
        "the host mount was taken down (mounted {mounted}, {keep:?})"
    );
    ensure_that!(files == 2, "host files next to the state directory were deleted ({files} of 2 left)");
    e.assert_clean()?;
    Ok(Outcome::Passed)
}

/// Attacks 3 and 5: guest root makes a setuid-root copy of busybox and a device node
/// in its rootfs; a volume's host directory is root's alone (as kubelet keeps secret
/// volumes) and has a mount below it. From the host: the pod's mounts are not in the
/// host's mount namespace at all; in the shim's, where they are, the sandbox directory is
/// 0700, user nobody can neither reach the setuid file nor read the volume through the
/// state directory, every mount below the sandbox is nosuid,nodev, the device node does
/// not open even for root, and the recursively read-only (`rro`) volume is read-only
/// down to its submount.
fn guest_files_and_volumes_are_out_of_host_users_reach() -> CaseResult {
    skip_unless_ready!();
    let e = env()?;
    let secret = tempfile::Builder::new().prefix("wisp-secret-").tempdir()?;
    std::fs::set_permissions(secret.path(), std::fs::Permissions::from_mode(0o700))?;
    std::fs::write(secret.path().join("token"), "s3cret\n")?;
    std::fs::create_dir(secret.path().join("sub"))?;
    mount_tmpfs(&secret.path().join("sub"))?;
    let result = (|| -> anyhow::Result<()> {
        let vol = format!("type=bind,src={},dst=/secret,options=rbind:rro", secret.path().display());
        start_privileged(&e, "suid", &["--mount", &vol])?;
        let script = "cp /bin/busybox /suid-bb && chmod 4755 /suid-bb; echo suid=$?
            mknod /devnode c 1 3; echo mknod=$?
            cat /secret/token; echo read=$?
            touch /secret/sub/x; echo submount_write=$?
            ls -l /suid-bb /devnode";
        let g = e.exec("suid", "plant", script)?;
        for s in ["suid", "read"] {
            ensure_that!(step(&g, s) == Some(0), "guest step {s} failed:\n{}\n{}", g.stdout, g.stderr);
        }
        ensure_that!(g.stdout.contains("s3cret"), "the volume was not readable in the guest: {}", g.stdout);
        ensure_that!(
            step(&g, "submount_write").is_some_and(|c| c != 0),
            "a mount below a read-only volume was writable from the guest:\n{}",
            g.stdout
        );

        let sb = Path::new("/run/wisp/suid");
        let mode = std::fs::metadata(sb)?.permissions().mode() & 0o7777;
        ensure_that!(mode == 0o700, "{} has mode {mode:o}, want 700", sb.display());
        let on_host = mounts_at_or_below(sb)?;
        ensure_that!(on_host.is_empty(), "the pod's mounts are in the host's mount namespace: {on_host:?}");
        let shim = serving_shim("suid")?;
        let rootfs = sb.join("shared/suid/rootfs");
        ensure_that!(!rootfs.join("suid-bb").exists(), "the planted file is on the host's path to the share");
        ensure_that!(in_ns_of(shim, &rootfs.join("suid-bb")).is_file(), "the planted file is not on the shim's share");
        let planted = rootfs.join("suid-bb");
        let meta = std::fs::metadata(in_ns_of(shim, &planted))?;
        ensure_that!(
            meta.permissions().mode() & 0o4000 != 0 && std::os::unix::fs::MetadataExt::uid(&meta) == 0,
            "the guest's file on the host is not setuid-root (mode {:o}): the attack was not set up",
            meta.permissions().mode()
        );
        // Not even in the shim's namespace can a user reach it (the sandbox directory is
        // 0700); were it reachable, the nosuid mount checked below would not honour its bit.
        let r = as_nobody_in_ns_of(shim, &["stat", &planted.display().to_string()])?;
        ensure_that!(
            r.code != 0 && r.stderr.contains("Permission denied"),
            "user nobody reaches the guest's setuid file: {} {}",
            r.stdout,
            r.stderr
        );
        let mounts = sb.join("shared/suid/mounts");
        let mut volumes = 0;
        for d in std::fs::read_dir(in_ns_of(shim, &mounts))? {
            let name = d?.file_name();
            if !in_ns_of(shim, &mounts.join(&name).join("token")).exists() {
                continue;
            }
            volumes += 1;
            let p = mounts.join(&name).join("token");
            let r = as_nobody_in_ns_of(shim, &["cat", &p.display().to_string()])?;
            ensure_that!(
                r.code != 0 && !r.stdout.contains("s3cret") && r.stderr.contains("Permission denied"),
                "user nobody read the volume through {}: {} {}",
                p.display(),
                r.stdout,
                r.stderr
            );
        }
        ensure_that!(volumes == 1, "found the volume {volumes} times below {}", mounts.display());

        let all = mounts_in(shim, &[sb]);
        ensure_that!(
            all.len() >= 4,
            "expected the view, rootfs, volume and its submount below {}: {all:?}",
            sb.display()
        );
        for m in &all {
            let (mp, opts) = (m.mount_point.display(), m.options.join(","));
            let has = |o: &str| m.options.iter().any(|x| x == o);
            ensure_that!(has("nosuid") && has("nodev"), "{mp} is mounted {opts}: not nosuid,nodev");
            if m.mount_point.to_string_lossy().contains("/mounts/") {
                ensure_that!(m.read_only, "{mp} (read-only volume or below) is mounted {opts}");
            }
        }
        // wisp-vmm's virtio-fs refuses to create device nodes at all (EPERM); were one
        // made, the host's nodev would keep it from opening.
        let dev = std::fs::File::open(in_ns_of(shim, &rootfs.join("devnode")));
        let refused = step(&g, "mknod").is_some_and(|c| c != 0) && g.stderr.contains("Operation not permitted");
        let unopenable = dev.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EACCES);
        ensure_that!(refused || unopenable, "the guest's device node opened on the host: {dev:?}\n{}", g.stderr);
        e.kill_and_delete("suid")
    })();
    if result.is_err() {
        let _ = e.kill_and_delete("suid");
    }
    let token = std::fs::read_to_string(secret.path().join("token")).unwrap_or_default();
    unmount(&secret.path().join("sub"));
    result?;
    ensure_that!(token == "s3cret\n", "the volume's file changed: {token:?}");
    e.assert_clean()?;
    Ok(Outcome::Passed)
}

/// Binds of the host's /proc, /sys and /dev are refused before any VM starts, with an
/// error that names the mount.
fn host_kernel_trees_are_not_shared() -> CaseResult {
    skip_unless_ready!();
    let e = env()?;
    for (i, src) in ["/proc", "/sys/fs/cgroup", "/dev"].iter().enumerate() {
        let m = format!("type=bind,src={src},dst=/host-tree,options=rbind:ro");
        let r = e.run(&format!("tree{i}"), &["--mount", &m], &["true"], None)?;
        ensure_that!(
            r.code != 0 && r.stderr.contains(src) && r.stderr.contains("/host-tree"),
            "bind of {src}: exit {} {:?}",
            r.code,
            r.stderr
        );
    }
    let vmms = wisp_tests::procs::all_vmm_pids();
    ensure_that!(vmms.is_empty(), "a VM was started for a refused spec: {vmms:?}");
    let _ = e.c.ctr_output(&["container", "delete", "tree0", "tree1", "tree2"]);
    e.assert_clean()?;
    Ok(Outcome::Passed)
}

/// `/proc/<pid>/status` field `name`, trimmed.
fn status_field(pid: u32, name: &str) -> anyhow::Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status.lines().find_map(|l| l.strip_prefix(&format!("{name}:"))).unwrap_or("").trim().to_string())
}

/// The VMM of a running pod is confined as the isolation issue asks: PID 1 of its own
/// PID namespace, its own mount, IPC, UTS and network namespaces, its root the jail
/// (the host's files gone, the share, sockets and /dev/kvm there), the 7 capabilities
/// `wisp_vmm::jail::KEPT_CAPS` names (also the bounding set), no_new_privs, in the
/// sandbox's cgroup, which goes with the pod.
fn the_vmm_is_jailed() -> CaseResult {
    skip_unless_ready!();
    let e = env()?;
    e.ok(&["run", "-d", "--runtime", RUNTIME, &e.image, "jailed", "sleep", "600"])?;
    let result = (|| -> anyhow::Result<()> {
        let vmms = wisp_tests::procs::vmm_pids("jailed");
        ensure_that!(vmms.len() == 1, "wisp-vmm processes of the pod: {vmms:?}");
        let pid = vmms[0];
        let want_caps = format!("{:016x}", wisp_vmm::jail::kept_caps_mask());
        for field in ["CapEff", "CapPrm", "CapBnd"] {
            let v = status_field(pid, field)?;
            ensure_that!(v == want_caps, "{field} of wisp-vmm is {v}, want {want_caps}");
        }
        for (field, want) in [("CapInh", "0000000000000000"), ("CapAmb", "0000000000000000"), ("NoNewPrivs", "1")] {
            let v = status_field(pid, field)?;
            ensure_that!(v == want, "{field} of wisp-vmm is {v}, want {want}");
        }
        // Every thread has its seccomp filter (mode 2), not only the main one.
        let mut threads = Vec::new();
        for t in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let t = t?.path();
            let comm = std::fs::read_to_string(t.join("comm"))?.trim().to_string();
            let status = std::fs::read_to_string(t.join("status"))?;
            let mode = status.lines().find_map(|l| l.strip_prefix("Seccomp:")).unwrap_or("").trim().to_string();
            ensure_that!(mode == "2", "wisp-vmm thread {comm} has Seccomp: {mode}, want 2 (filter)");
            threads.push(comm);
        }
        eprintln!("hostile: wisp-vmm threads, all with seccomp filters: {threads:?}");
        ensure_that!(
            threads.iter().any(|t| t.starts_with("vcpu")) && threads.iter().any(|t| t == "devices"),
            "no vCPU or device thread among {threads:?}"
        );
        let nspid = status_field(pid, "NSpid")?;
        ensure_that!(
            nspid.split_whitespace().last() == Some("1"),
            "wisp-vmm is not PID 1 of its own namespace: NSpid {nspid}"
        );
        for ns in ["pid", "mnt", "net", "ipc", "uts"] {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))?;
            let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"))?;
            ensure_that!(theirs != ours, "wisp-vmm shares the host's {ns} namespace ({theirs:?})");
        }
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        for gone in ["etc/passwd", "usr/bin", "run/containerd", "run/wisp/jailed/skel"] {
            ensure_that!(!root.join(gone).exists(), "/{gone} is visible in wisp-vmm's root");
        }
        for there in ["dev/kvm", "run/wisp/jailed/shared/jailed/rootfs/bin/busybox", "run/wisp/jailed/vmm/vsock.sock"] {
            ensure_that!(root.join(there).exists(), "/{there} is missing from wisp-vmm's root");
        }
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
        let bundle = e.c.dir.path().join("state/io.containerd.runtime.v2.task/wisp-test/jailed/config.json");
        let spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&bundle)?)?;
        let path = spec.pointer("/linux/cgroupsPath").and_then(|v| v.as_str()).unwrap_or_default().to_string();
        ensure_that!(!path.is_empty(), "the sandbox's spec has no linux.cgroupsPath");
        ensure_that!(
            cgroup.trim() == format!("0::{path}"),
            "wisp-vmm's cgroup is {:?}, want the sandbox's {path}",
            cgroup.trim()
        );
        e.kill_and_delete("jailed")?;
        let dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
        ensure_that!(!dir.exists(), "the VMM's cgroup {} is left after the pod", dir.display());
        Ok(())
    })();
    if result.is_err() {
        let _ = e.kill_and_delete("jailed");
    }
    result?;
    e.assert_clean()?;
    Ok(Outcome::Passed)
}

/// For each kind of VMM thread: the test-only trigger (`wisp-vmm --seccomp-selftest
/// KIND:SECS`, passed by a wrapper) makes a thread of that kind call mount(2) once the
/// pod runs; the filter must kill the VMM, the pod's task must stop, and the shim's log
/// must say why.
fn a_forbidden_call_kills_the_vmm_and_stops_the_pod() -> CaseResult {
    skip_unless_ready!();
    let dir = tempfile::tempdir()?;
    for kind in ["vcpu", "devices", "control"] {
        let wrapper = dir.path().join(format!("vmm-{kind}"));
        let vmm = wisp_tests::artifact("release/wisp-vmm");
        std::fs::write(&wrapper, format!("#!/bin/sh\nexec {} --seccomp-selftest {kind}:20 \"$@\"\n", vmm.display()))?;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        let c = wisp_tests::containerd::Containerd::start(&wisp_tests::containerd::wisp_config_with_vmm(
            &wrapper,
            wisp_tests::ctr::DEBUG,
        ))?;
        let image = c.import_busybox()?;
        let e = Env { c, image };
        let id = format!("sigsys-{kind}");
        e.ok(&["run", "-d", "--runtime", RUNTIME, &e.image, &id, "sleep", "600"])?;
        // Activity wakes the vCPU and device threads (each checks the trigger when it wakes).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
        let mut n = 0;
        loop {
            if e.ok(&["task", "ls"])?.contains("STOPPED") {
                break;
            }
            ensure_that!(
                std::time::Instant::now() < deadline,
                "{kind}: the pod still runs 180 s after the forbidden call was armed"
            );
            n += 1;
            let _ = e.exec(&id, &format!("poke{n}"), "echo poke > /tmp/poke && cat /tmp/poke");
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        // The shim's log reaches containerd's through a pipe: give it a moment.
        let said = (0..50).any(|_| {
            let found = e.c.log().contains("killed by its seccomp filter");
            if !found {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            found
        });
        // How the VM ended instead, if not so (a nested triple fault is an emulator
        // fault the harness reruns; anything else is ours).
        ensure_that!(
            said,
            "{kind}: the shim's log does not say the VMM was killed by its seccomp filter:\n{}",
            e.c.diagnostics()
        );
        e.ok(&["task", "delete", &id])?;
        e.ok(&["container", "delete", &id])?;
        e.assert_clean()?;
        eprintln!("hostile: {kind} thread: forbidden call killed the VMM, task stopped after {n} pokes");
    }
    Ok(Outcome::Passed)
}

fn main() {
    Suite::new("hostile")
        .case("teardown_follows_nothing_the_guest_planted", teardown_follows_nothing_the_guest_planted)
        .case(
            "guest_files_and_volumes_are_out_of_host_users_reach",
            guest_files_and_volumes_are_out_of_host_users_reach,
        )
        .case("host_kernel_trees_are_not_shared", host_kernel_trees_are_not_shared)
        .case("the_vmm_is_jailed", the_vmm_is_jailed)
        .case("a_forbidden_call_kills_the_vmm_and_stops_the_pod", a_forbidden_call_kills_the_vmm_and_stops_the_pod)
        .run()
}
