//! Validation and guest rewriting of the OCI specs the shim sends.
//!
//! Everything here is untrusted request data: it is parsed with bounds, checked for
//! what would otherwise fail deep inside libcontainer (or in a forked child, where the
//! error is harder to report), and rewritten for the pod-in-a-VM model:
//! - namespaces: the pod's sandbox (pause) container creates the IPC and UTS (and PID)
//!   namespaces; every other container of the pod joins them through
//!   `/proc/<sandbox init pid>/ns/<type>` (PID only when its spec asks to share, i.e.
//!   names a path). Paths in the incoming spec are the host's view and are never used.
//!   In the guest the network namespace entry is dropped: the VM is the pod's network
//!   namespace, configured by UpdateInterface/UpdateRoutes. On a host (test mode)
//!   members join the sandbox container's network namespace instead.
//! - `net.*` sysctls: in the guest they apply to the VM's (= the pod's) network
//!   namespace and are written by the agent, since libcontainer refuses them without a
//!   network namespace entry.
//! - hooks are dropped: their paths are host paths; so are AppArmor/SELinux labels,
//!   which name host policies (the guest kernel has no LSM).
//! - the cgroup path: `linux.cgroupsPath` when it is a plain path, else
//!   `<cgroup parent>/<container id>` (systemd-style `slice:prefix:name` has no
//!   meaning in the guest, which has no systemd).

use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType, Process, Spec};

/// Largest accepted spec or process JSON.
pub const MAX_JSON_BYTES: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{what} is {len} bytes; the limit is {MAX_JSON_BYTES}")]
    TooLarge { what: &'static str, len: usize },
    #[error("{what} is not valid JSON for an OCI {what}: {msg}")]
    Json { what: &'static str, msg: String },
    #[error("{kind} id {id:?} is invalid: {why}")]
    BadId { kind: &'static str, id: String, why: &'static str },
    #[error("unsupported OCI version {0:?}: only 1.x specs are accepted")]
    Version(String),
    #[error("the spec has no {0} section")]
    Missing(&'static str),
    #[error("root.path {0:?} must be an absolute guest path")]
    RootNotAbsolute(PathBuf),
    #[error("root.path {0:?} does not exist in the guest or is not a directory (is the shared filesystem mounted?)")]
    RootMissing(PathBuf),
    #[error("process.args is empty: nothing to run")]
    NoArgs,
    #[error("process.cwd {0:?} must be an absolute path")]
    CwdNotAbsolute(PathBuf),
    #[error("process.{0} contains a NUL byte")]
    Nul(&'static str),
    #[error("linux.namespaces lists {0:?} twice")]
    DuplicateNamespace(LinuxNamespaceType),
    #[error("linux.cgroupsPath {0:?} must not contain '.' or '..' components")]
    BadCgroupPath(String),
    #[error("sysctl {0:?} is not a valid key or value")]
    BadSysctl(String),
    #[error("linux.rootfsPropagation {0:?} is not one of shared, slave, private, unbindable (or their r-forms)")]
    BadRootfsPropagation(String),
    #[error("the pod's sandbox container is not running: cannot join its namespaces")]
    SandboxGone,
}

/// Where this container sits in its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodRole {
    /// The pod's sandbox (pause) container: creates the shared namespaces.
    Sandbox,
    /// Another container; joins the namespaces of the sandbox container's init, if any.
    Member { sandbox_pid: Option<i32> },
}

/// Agent-wide rules for rewriting specs.
#[derive(Debug, Clone)]
pub struct SpecPolicy {
    /// In the guest VM (not host test mode).
    pub guest: bool,
    /// Cgroup parent for containers without a usable cgroupsPath.
    pub cgroup_parent: PathBuf,
}

#[derive(Debug)]
pub struct PreparedSpec {
    pub spec: Spec,
    pub cgroup_path: PathBuf,
    /// `net.*` sysctls for the agent to apply to the VM's network namespace.
    pub net_sysctls: Vec<(String, String)>,
    /// Whether the container's init is PID 1 of a PID namespace of its own. When it is
    /// not (it shares the pod's or the guest's), the kernel does not end the rest of the
    /// container with it: the agent must (see `Sandbox::wait_process`).
    pub own_pid_ns: bool,
}

/// Checks a sandbox, container or exec id against the rule the shim applies to what
/// containerd sends it (`wisp_protocols::ids::check_id`).
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), SpecError> {
    wisp_protocols::ids::check_id(id).map_err(|why| SpecError::BadId { kind, id: id.chars().take(64).collect(), why })
}

fn check_size(what: &'static str, json: &[u8]) -> Result<(), SpecError> {
    if json.len() > MAX_JSON_BYTES {
        return Err(SpecError::TooLarge { what, len: json.len() });
    }
    Ok(())
}

pub fn parse_spec(json: &[u8]) -> Result<Spec, SpecError> {
    check_size("spec", json)?;
    serde_json::from_slice(json).map_err(|e| SpecError::Json { what: "spec", msg: e.to_string() })
}

pub fn parse_process(json: &[u8]) -> Result<Process, SpecError> {
    check_size("process", json)?;
    serde_json::from_slice(json).map_err(|e| SpecError::Json { what: "process", msg: e.to_string() })
}

pub fn parse_resources(json: &[u8]) -> Result<oci_spec::runtime::LinuxResources, SpecError> {
    check_size("resources", json)?;
    serde_json::from_slice(json).map_err(|e| SpecError::Json { what: "resources", msg: e.to_string() })
}

/// Checks what libcontainer would otherwise trip over in its forked children.
pub fn validate_process(p: &Process) -> Result<(), SpecError> {
    let args = p.args().as_ref().filter(|a| !a.is_empty()).ok_or(SpecError::NoArgs)?;
    if args[0].is_empty() {
        return Err(SpecError::NoArgs);
    }
    if args.iter().any(|a| a.contains('\0')) {
        return Err(SpecError::Nul("args"));
    }
    if p.env().as_ref().is_some_and(|env| env.iter().any(|e| e.contains('\0'))) {
        return Err(SpecError::Nul("env"));
    }
    if !p.cwd().is_absolute() {
        return Err(SpecError::CwdNotAbsolute(p.cwd().clone()));
    }
    Ok(())
}

/// Prepares an exec's process: validated, terminal as the stdio request says.
pub fn prepare_exec_process(mut p: Process, terminal: bool) -> Result<Process, SpecError> {
    validate_process(&p)?;
    p.set_terminal(Some(terminal));
    drop_host_lsm_labels(&mut p);
    Ok(p)
}

/// AppArmor profiles and SELinux labels name the host's policies; the guest kernel
/// has no LSM, and libcontainer refuses a profile it cannot apply.
fn drop_host_lsm_labels(p: &mut Process) {
    p.set_apparmor_profile(None);
    p.set_selinux_label(None);
}

/// Validates and rewrites a container spec for this guest.
pub fn prepare(
    mut spec: Spec,
    container_id: &str,
    policy: &SpecPolicy,
    role: PodRole,
    terminal: bool,
) -> Result<PreparedSpec, SpecError> {
    if !spec.version().starts_with("1.") {
        return Err(SpecError::Version(spec.version().clone()));
    }
    let root = spec.root().as_ref().ok_or(SpecError::Missing("root"))?;
    if !root.path().is_absolute() {
        return Err(SpecError::RootNotAbsolute(root.path().clone()));
    }
    if !root.path().is_dir() {
        return Err(SpecError::RootMissing(root.path().clone()));
    }
    let mut process = spec.process().clone().ok_or(SpecError::Missing("process"))?;
    validate_process(&process)?;
    process.set_terminal(Some(terminal));
    drop_host_lsm_labels(&mut process);
    spec.set_process(Some(process));
    spec.set_hooks(None);

    let mut linux = spec.linux().clone().ok_or(SpecError::Missing("linux"))?;
    let mut namespaces = linux.namespaces().clone().unwrap_or_default();
    rewrite_namespaces(&mut namespaces, role, policy.guest)?;
    let own_pid_ns = namespaces.iter().any(|ns| ns.typ() == LinuxNamespaceType::Pid && ns.path().is_none());
    linux.set_namespaces(Some(namespaces));
    linux.set_mount_label(None);
    let propagation = rootfs_propagation(linux.rootfs_propagation().as_deref())?;
    linux.set_rootfs_propagation(propagation);

    let cgroup_path = cgroup_path(linux.cgroups_path().as_deref(), container_id, &policy.cgroup_parent)?;
    linux.set_cgroups_path(Some(cgroup_path.clone()));

    let mut net_sysctls = Vec::new();
    if let Some(sysctls) = linux.sysctl().clone() {
        let mut kept = std::collections::HashMap::new();
        for (k, v) in sysctls {
            check_sysctl(&k, &v)?;
            if policy.guest && k.starts_with("net.") {
                net_sysctls.push((k, v));
            } else {
                kept.insert(k, v);
            }
        }
        net_sysctls.sort();
        linux.set_sysctl(Some(kept));
    }
    spec.set_linux(Some(linux));
    Ok(PreparedSpec { spec, cgroup_path, net_sysctls, own_pid_ns })
}

/// libcontainer takes `shared`, `slave`, `private` and `unbindable` (and applies each to
/// the whole tree); containerd writes runc's recursive names, `rslave` for a volume with
/// host-to-container propagation and `rshared` for a bidirectional one.
fn rootfs_propagation(p: Option<&str>) -> Result<Option<String>, SpecError> {
    const KNOWN: [&str; 4] = ["shared", "slave", "private", "unbindable"];
    let Some(v) = p.filter(|v| !v.is_empty()) else { return Ok(None) };
    let base = v.strip_prefix('r').filter(|b| KNOWN.contains(b)).unwrap_or(v);
    if KNOWN.contains(&base) {
        Ok(Some(base.to_string()))
    } else {
        Err(SpecError::BadRootfsPropagation(v.chars().take(64).collect()))
    }
}

fn check_sysctl(k: &str, v: &str) -> Result<(), SpecError> {
    let key_ok = !k.is_empty()
        && k.len() <= 256
        && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/'))
        && !k.split(['.', '/']).any(|part| part.is_empty() || part == "..");
    if !key_ok || v.contains('\n') || v.len() > 4096 {
        return Err(SpecError::BadSysctl(k.chars().take(64).collect()));
    }
    Ok(())
}

/// The /proc/sys file of a sysctl key.
pub fn sysctl_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

/// Rewrites namespace entries for the container's role in the pod (see module doc).
pub fn rewrite_namespaces(nss: &mut Vec<LinuxNamespace>, role: PodRole, guest: bool) -> Result<(), SpecError> {
    let mut seen = Vec::new();
    for ns in nss.iter() {
        if seen.contains(&ns.typ()) {
            return Err(SpecError::DuplicateNamespace(ns.typ()));
        }
        seen.push(ns.typ());
    }
    if guest {
        nss.retain(|ns| ns.typ() != LinuxNamespaceType::Network);
    }
    let join = |pid: i32, name: &str| Some(PathBuf::from(format!("/proc/{pid}/ns/{name}")));
    for ns in nss.iter_mut() {
        let asked_to_share = ns.path().as_ref().is_some_and(|p| !p.as_os_str().is_empty());
        let path = match (ns.typ(), role) {
            (_, PodRole::Sandbox) | (_, PodRole::Member { sandbox_pid: None }) => None,
            (LinuxNamespaceType::Ipc, PodRole::Member { sandbox_pid: Some(pid) }) => join(pid, "ipc"),
            (LinuxNamespaceType::Uts, PodRole::Member { sandbox_pid: Some(pid) }) => join(pid, "uts"),
            (LinuxNamespaceType::Network, PodRole::Member { sandbox_pid: Some(pid) }) => join(pid, "net"),
            (LinuxNamespaceType::Pid, PodRole::Member { sandbox_pid: Some(pid) }) if asked_to_share => join(pid, "pid"),
            _ => None,
        };
        ns.set_path(path);
    }
    Ok(())
}

/// The container's cgroup path (see module doc).
pub fn cgroup_path(spec_path: Option<&Path>, container_id: &str, parent: &Path) -> Result<PathBuf, SpecError> {
    let default = || parent.join(container_id);
    let Some(p) = spec_path else { return Ok(default()) };
    let s = p.to_string_lossy();
    if s.is_empty() || (s.contains(':') && !s.starts_with('/')) {
        return Ok(default());
    }
    if s.len() > 1024
        || p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || s.contains("/./")
    {
        return Err(SpecError::BadCgroupPath(s.chars().take(128).collect()));
    }
    if p.is_absolute() {
        if p == Path::new("/") {
            return Ok(default());
        }
        Ok(p.to_path_buf())
    } else {
        Ok(parent.join(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxNamespaceBuilder;

    fn ns(t: LinuxNamespaceType, path: Option<&str>) -> LinuxNamespace {
        let mut b = LinuxNamespaceBuilder::default().typ(t);
        if let Some(p) = path {
            b = b.path(p);
        }
        b.build().unwrap()
    }

    fn pod_nss() -> Vec<LinuxNamespace> {
        vec![
            ns(LinuxNamespaceType::Pid, None),
            ns(LinuxNamespaceType::Ipc, Some("/proc/999/ns/ipc")),
            ns(LinuxNamespaceType::Uts, Some("/proc/999/ns/uts")),
            ns(LinuxNamespaceType::Mount, None),
            ns(LinuxNamespaceType::Network, Some("/var/run/netns/cni-1")),
        ]
    }

    fn path_of(nss: &[LinuxNamespace], t: LinuxNamespaceType) -> Option<Option<String>> {
        nss.iter().find(|n| n.typ() == t).map(|n| n.path().as_ref().map(|p| p.display().to_string()))
    }

    #[test]
    fn rootfs_propagation_takes_runcs_recursive_names() {
        assert_eq!(rootfs_propagation(Some("rslave")).unwrap().as_deref(), Some("slave"));
        assert_eq!(rootfs_propagation(Some("rshared")).unwrap().as_deref(), Some("shared"));
        assert_eq!(rootfs_propagation(Some("private")).unwrap().as_deref(), Some("private"));
        assert_eq!(rootfs_propagation(Some("")).unwrap(), None);
        assert_eq!(rootfs_propagation(None).unwrap(), None);
        for bad in ["r", "rr", "rrslave", "sideways", "slave\0"] {
            let e = rootfs_propagation(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("rootfsPropagation"), "{e}");
        }
    }

    #[test]
    fn members_join_the_sandbox_namespaces_in_the_guest() {
        let mut nss = pod_nss();
        rewrite_namespaces(&mut nss, PodRole::Member { sandbox_pid: Some(42) }, true).unwrap();
        assert_eq!(path_of(&nss, LinuxNamespaceType::Ipc), Some(Some("/proc/42/ns/ipc".into())));
        assert_eq!(path_of(&nss, LinuxNamespaceType::Uts), Some(Some("/proc/42/ns/uts".into())));
        assert_eq!(path_of(&nss, LinuxNamespaceType::Pid), Some(None), "no pid sharing asked");
        assert_eq!(path_of(&nss, LinuxNamespaceType::Mount), Some(None));
        assert_eq!(path_of(&nss, LinuxNamespaceType::Network), None, "the VM is the pod's netns");
    }

    #[test]
    fn shared_pid_namespace_and_host_mode_network() {
        let mut nss = pod_nss();
        nss[0] = ns(LinuxNamespaceType::Pid, Some("/proc/999/ns/pid"));
        rewrite_namespaces(&mut nss, PodRole::Member { sandbox_pid: Some(7) }, false).unwrap();
        assert_eq!(path_of(&nss, LinuxNamespaceType::Pid), Some(Some("/proc/7/ns/pid".into())));
        assert_eq!(path_of(&nss, LinuxNamespaceType::Network), Some(Some("/proc/7/ns/net".into())));
    }

    #[test]
    fn the_sandbox_and_lone_containers_create_fresh_namespaces() {
        for role in [PodRole::Sandbox, PodRole::Member { sandbox_pid: None }] {
            let mut nss = pod_nss();
            rewrite_namespaces(&mut nss, role, false).unwrap();
            assert!(nss.iter().all(|n| n.path().is_none()), "{role:?}");
            assert_eq!(nss.len(), 5);
        }
        let mut dup = vec![ns(LinuxNamespaceType::Ipc, None), ns(LinuxNamespaceType::Ipc, None)];
        assert!(matches!(rewrite_namespaces(&mut dup, PodRole::Sandbox, true), Err(SpecError::DuplicateNamespace(_))));
    }

    #[test]
    fn cgroup_paths() {
        let parent = Path::new("/wisp");
        assert_eq!(cgroup_path(None, "c1", parent).unwrap(), PathBuf::from("/wisp/c1"));
        assert_eq!(
            cgroup_path(Some(Path::new("/kubepods/pod1/c1")), "c1", parent).unwrap(),
            PathBuf::from("/kubepods/pod1/c1")
        );
        assert_eq!(cgroup_path(Some(Path::new("pod1/c1")), "c1", parent).unwrap(), PathBuf::from("/wisp/pod1/c1"));
        assert_eq!(
            cgroup_path(Some(Path::new("kubepods.slice:cri-containerd:c1")), "c1", parent).unwrap(),
            PathBuf::from("/wisp/c1")
        );
        assert!(cgroup_path(Some(Path::new("/a/../../etc")), "c1", parent).is_err());
        assert!(cgroup_path(Some(Path::new("a/./b")), "c1", parent).is_err());
    }

    #[test]
    fn a_refused_id_names_its_kind_and_why() {
        assert!(validate_id("container", "abc-1.2_x+y").is_ok());
        let e = validate_id("exec", "a/b").unwrap_err().to_string();
        assert_eq!(e, "exec id \"a/b\" is invalid: only letters, digits and _ - . + are allowed");
    }

    fn minimal_spec(root: &Path) -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": root},
            "process": {"args": ["/bin/true"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0},
                        "apparmorProfile": "cri-containerd.apparmor.d", "selinuxLabel": "system_u:system_r:container_t:s0"},
            "linux": {"namespaces": [{"type": "mount"}, {"type": "network", "path": "/x"}],
                      "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1"}}
        })
    }

    #[test]
    fn specs_are_validated_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let policy = SpecPolicy { guest: true, cgroup_parent: "/wisp".into() };
        let json = serde_json::to_vec(&minimal_spec(dir.path())).unwrap();
        let spec = parse_spec(&json).unwrap();
        let p = prepare(spec, "c1", &policy, PodRole::Sandbox, true).unwrap();
        assert_eq!(p.cgroup_path, PathBuf::from("/wisp/c1"));
        assert_eq!(p.net_sysctls, vec![("net.ipv4.ip_unprivileged_port_start".to_string(), "0".to_string())]);
        let linux = p.spec.linux().as_ref().unwrap();
        assert_eq!(linux.sysctl().as_ref().unwrap().len(), 1);
        assert_eq!(linux.namespaces().as_ref().unwrap().len(), 1);
        assert_eq!(p.spec.process().as_ref().unwrap().terminal(), Some(true));
        assert!(p.spec.process().as_ref().unwrap().apparmor_profile().is_none());
        assert!(p.spec.process().as_ref().unwrap().selinux_label().is_none());
        assert_eq!(sysctl_path("net.ipv4.ip_forward"), PathBuf::from("/proc/sys/net/ipv4/ip_forward"));

        let bad = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = minimal_spec(dir.path());
            f(&mut v);
            let json = serde_json::to_vec(&v).unwrap();
            parse_spec(&json).and_then(|s| prepare(s, "c1", &policy, PodRole::Sandbox, false)).unwrap_err()
        };
        assert!(matches!(bad(&|v| v["ociVersion"] = "2.0".into()), SpecError::Version(_)));
        assert!(matches!(bad(&|v| v["root"]["path"] = "relative".into()), SpecError::RootNotAbsolute(_)));
        assert!(matches!(bad(&|v| v["root"]["path"] = "/nonexistent/rootfs".into()), SpecError::RootMissing(_)));
        assert!(matches!(bad(&|v| v["process"]["args"] = serde_json::json!([])), SpecError::NoArgs));
        assert!(matches!(bad(&|v| v["process"]["cwd"] = "tmp".into()), SpecError::CwdNotAbsolute(_)));
        assert!(matches!(bad(&|v| v["process"]["user"]["uid"] = (-1).into()), SpecError::Json { .. }));
        assert!(matches!(bad(&|v| v["linux"]["namespaces"][0]["type"] = "bogus".into()), SpecError::Json { .. }));
        assert!(matches!(bad(&|v| v["linux"]["sysctl"]["net/../x"] = "1".into()), SpecError::BadSysctl(_)));
        assert!(matches!(
            bad(&|v| {
                v.as_object_mut().unwrap().remove("linux");
            }),
            SpecError::Missing("linux")
        ));
        assert!(matches!(parse_spec(b"{not json"), Err(SpecError::Json { .. })));
        assert!(matches!(parse_spec(&vec![b' '; MAX_JSON_BYTES + 1]), Err(SpecError::TooLarge { .. })));
    }

    #[test]
    fn only_a_fresh_pid_namespace_is_the_containers_own() {
        let dir = tempfile::tempdir().unwrap();
        let policy = SpecPolicy { guest: true, cgroup_parent: "/wisp".into() };
        let own = |nss: serde_json::Value, role: PodRole| {
            let mut v = minimal_spec(dir.path());
            v["linux"]["namespaces"] = nss;
            let spec = parse_spec(&serde_json::to_vec(&v).unwrap()).unwrap();
            prepare(spec, "c1", &policy, role, false).unwrap().own_pid_ns
        };
        let member = PodRole::Member { sandbox_pid: Some(7) };
        assert!(own(serde_json::json!([{"type": "pid"}, {"type": "mount"}]), PodRole::Sandbox));
        assert!(own(serde_json::json!([{"type": "pid"}, {"type": "mount"}]), member));
        // Sharing the sandbox's (CRI's shareProcessNamespace) or the guest's.
        assert!(!own(serde_json::json!([{"type": "pid", "path": "/proc/1/ns/pid"}, {"type": "mount"}]), member));
        assert!(!own(serde_json::json!([{"type": "mount"}]), member));
        assert!(!own(serde_json::json!([{"type": "mount"}]), PodRole::Sandbox));
    }

    #[test]
    fn exec_processes_are_validated() {
        let p = parse_process(br#"{"args":["sh"],"cwd":"/","terminal":false,"user":{"uid":0,"gid":0}}"#).unwrap();
        assert_eq!(prepare_exec_process(p, true).unwrap().terminal(), Some(true));
        let p = parse_process(br#"{"args":[],"cwd":"/","user":{"uid":0,"gid":0}}"#).unwrap();
        assert!(matches!(prepare_exec_process(p, false), Err(SpecError::NoArgs)));
        assert!(parse_process(b"[]").is_err());
    }
}
