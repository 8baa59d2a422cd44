//! Reading a container's OCI spec from its bundle and rewriting it for the guest.
//!
//! The shim only rewrites paths: the rootfs and every bind mount move onto the shared
//! directory the guest sees through virtio-fs, and `/dev/shm` becomes a guest tmpfs.
//! Namespaces, hooks, LSM labels and cgroup paths are the agent's business (it knows
//! the guest). The spec comes from containerd (trusted) but is still parsed carefully:
//! a malformed one is an error naming the bundle, never a panic.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::hooks::Hooks;

pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
/// Where the agent mounts the shared directory in the guest.
pub const GUEST_SHARED_DIR: &str = "/run/wisp/shared";

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a valid OCI spec: {reason}")]
    Invalid { path: String, reason: String },
}

/// A bundle's `config.json`: what the shim uses of it, read once when it is loaded
/// (annotations, binds, network namespace, hooks, hostname, cgroup), and the whole JSON,
/// kept so every field containerd set reaches the guest (`for_guest`) and the hooks.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    pub json: Value,
    /// The string-valued annotations.
    pub annotations: HashMap<String, String>,
    /// The bind mounts that must be shared into the guest, in spec order.
    pub binds: Vec<SharedBind>,
    /// The pod's network namespace (`linux.namespaces`, type network, with a path).
    pub netns: Option<PathBuf>,
    /// The host-side OCI hooks.
    pub hooks: Hooks,
    pub hostname: String,
    /// `linux.cgroupsPath`, as containerd wrote it.
    pub cgroups_path: Option<String>,
    /// `root.path` as written (relative to the bundle unless absolute).
    root: String,
}

impl BundleSpec {
    pub fn load(bundle: &Path) -> Result<Self, SpecError> {
        let path = bundle.join("config.json");
        let p = path.display().to_string();
        let text = std::fs::read(&path).map_err(|source| SpecError::Read { path: p.clone(), source })?;
        Self::parse(&text, &p)
    }

    pub fn parse(text: &[u8], origin: &str) -> Result<Self, SpecError> {
        let invalid = |reason: String| SpecError::Invalid { path: origin.into(), reason };
        let json: Value = serde_json::from_slice(text).map_err(|e| invalid(e.to_string()))?;
        if !json.is_object() {
            return Err(invalid("not a JSON object".into()));
        }
        if json.pointer("/process").is_none_or(|p| !p.is_object()) {
            return Err(invalid("no process section".into()));
        }
        let annotations = json
            .get("annotations")
            .and_then(Value::as_object)
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default();
        let binds = shared_binds(&json);
        let netns = crate::network::netns_path(&json).map_err(|e| invalid(e.to_string()))?;
        let hooks = Hooks::from_spec(&json).map_err(|e| invalid(e.to_string()))?;
        let text_at = |ptr: &str| json.pointer(ptr).and_then(Value::as_str).map(str::to_string);
        let hostname = text_at("/hostname").unwrap_or_default();
        let cgroups_path = text_at("/linux/cgroupsPath");
        let root = text_at("/root/path").unwrap_or_else(|| "rootfs".into());
        Ok(Self { annotations, binds, netns, hooks, hostname, cgroups_path, root, json })
    }

    /// The pod this container belongs to: the CRI sandbox-id annotation, else itself.
    pub fn sandbox_id(&self, container_id: &str) -> String {
        self.annotations.get(SANDBOX_ID_ANNOTATION).cloned().unwrap_or_else(|| container_id.to_string())
    }

    /// True unless CRI says this is an application container of a pod.
    pub fn is_sandbox_container(&self) -> bool {
        self.annotations.get(CONTAINER_TYPE_ANNOTATION).is_none_or(|t| t != "container")
    }

    /// The spec's `root.path`, resolved against the bundle when relative.
    pub fn root_path(&self, bundle: &Path) -> PathBuf {
        bundle.join(&self.root)
    }

    /// The spec the agent gets: rootfs and shared binds at their guest paths under the
    /// container's directory on the share, `/dev/shm` as a tmpfs. `submounts` (by the
    /// bind's index) become binds of their own right after their bind: the guest sees a
    /// volume as one virtio-fs tree, so a writable mount below a read-only volume needs
    /// its own writable bind there, as the host has it.
    pub fn for_guest(&self, container_id: &str, submounts: &GuestSubmounts) -> Value {
        let mut spec = self.json.clone();
        let cdir = format!("{GUEST_SHARED_DIR}/{container_id}");
        if let Some(root) = spec.get_mut("root").and_then(Value::as_object_mut) {
            root.insert("path".into(), Value::String(format!("{cdir}/rootfs")));
        } else if let Some(obj) = spec.as_object_mut() {
            obj.insert("root".into(), serde_json::json!({ "path": format!("{cdir}/rootfs") }));
        }
        let binds: HashMap<usize, &SharedBind> = self.binds.iter().map(|b| (b.index, b)).collect();
        if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
            let mut out = Vec::with_capacity(mounts.len());
            for (i, mut m) in std::mem::take(mounts).into_iter().enumerate() {
                if m.get("destination").and_then(Value::as_str) == Some("/dev/shm") {
                    m = serde_json::json!({
                        "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                        "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
                    });
                } else if let Some(b) = binds.get(&i) {
                    let source = format!("{cdir}/{}", b.share_name());
                    if let Some(obj) = m.as_object_mut() {
                        obj.insert("source".into(), Value::String(source.clone()));
                    }
                    out.push(m);
                    for sub in submounts.get(&i).into_iter().flatten() {
                        let rel = sub.path.display();
                        out.push(serde_json::json!({
                            "destination": format!("{}/{rel}", b.destination.trim_end_matches('/')),
                            "type": "bind",
                            "source": format!("{source}/{rel}"),
                            "options": ["rbind", if sub.read_only { "ro" } else { "rw" }],
                        }));
                    }
                    continue;
                }
                out.push(m);
            }
            *mounts = out;
        }
        spec
    }
}

fn options(m: &Value) -> Vec<String> {
    m.get("options")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|o| o.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

fn is_bind(m: &Value) -> bool {
    m.get("type").and_then(Value::as_str) == Some("bind") || options(m).iter().any(|o| o == "bind" || o == "rbind")
}

/// How a bind may be written to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadWrite,
    /// `ro`: the bind's top mount is read-only; mounts below it keep their own flags.
    ReadOnly,
    /// `rro`: read-only all the way down.
    RecursiveReadOnly,
}

/// The bind mounts that must be shared into the guest, in spec order.
fn shared_binds(json: &Value) -> Vec<SharedBind> {
    let mut out = Vec::new();
    for (index, m) in mounts(json).iter().enumerate() {
        if !is_bind(m) {
            continue;
        }
        let Some(dest) = m.get("destination").and_then(Value::as_str) else { continue };
        if dest == "/dev/shm" {
            continue;
        }
        let Some(source) = m.get("source").and_then(Value::as_str) else { continue };
        let opts = options(m);
        let has = |o: &str| opts.iter().any(|x| x == o);
        // `rro` (recursive read-only: containerd 2 writes it, without `ro`, when the
        // handler declares it) makes every submount read-only; `ro` only the bind's
        // top mount, as runc does.
        let access = if has("rro") {
            Access::RecursiveReadOnly
        } else if has("ro") {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        out.push(SharedBind {
            index,
            source: PathBuf::from(source),
            destination: dest.to_string(),
            access,
            recursive: has("rbind") || has("rro"),
        });
    }
    out
}

fn mounts(json: &Value) -> Vec<Value> {
    json.get("mounts").and_then(Value::as_array).cloned().unwrap_or_default()
}

/// A host path the container bind-mounts, and where it goes on the share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedBind {
    /// Position in the spec's mounts (names the share entry, so it is unique).
    pub index: usize,
    pub source: PathBuf,
    pub destination: String,
    pub access: Access,
    /// `rbind` (or `rro`): the source's submounts come along.
    pub recursive: bool,
}

/// A mount below a shared bind whose flags the guest must be told of, its path relative
/// to the bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSubmount {
    pub path: PathBuf,
    pub read_only: bool,
}

/// Submounts by the index of their bind in the spec's mounts.
pub type GuestSubmounts = HashMap<usize, Vec<GuestSubmount>>;

impl SharedBind {
    /// Path relative to the container's directory on the share.
    pub fn share_name(&self) -> String {
        format!("mounts/{}", self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: Value) -> BundleSpec {
        let mut base = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": { "args": ["sh"], "cwd": "/", "terminal": true },
            "root": { "path": "rootfs", "readonly": true },
            "hostname": "pod-a",
            "mounts": [
                { "destination": "/proc", "type": "proc", "source": "proc" },
                { "destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts", "options": ["rbind", "ro"] },
                { "destination": "/dev/shm", "type": "bind", "source": "/run/x/shm", "options": ["rbind"] },
                { "destination": "/data", "source": "/srv/data", "options": ["rbind", "rw"] }
            ],
            "annotations": { "io.kubernetes.cri.sandbox-id": "sb1", "io.kubernetes.cri.container-type": "container" }
        });
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        BundleSpec::parse(base.to_string().as_bytes(), "test").unwrap()
    }

    #[test]
    fn reads_pod_membership() {
        let s = spec(serde_json::json!({}));
        assert_eq!(s.sandbox_id("c1"), "sb1");
        assert!(!s.is_sandbox_container());
        let plain = spec(serde_json::json!({ "annotations": {} }));
        assert_eq!(plain.sandbox_id("c1"), "c1");
        assert!(plain.is_sandbox_container());
    }

    #[test]
    fn binds_move_to_the_share_and_shm_becomes_tmpfs() {
        let s = spec(serde_json::json!({}));
        let binds = &s.binds;
        assert_eq!(binds.len(), 2);
        assert_eq!((binds[0].index, binds[0].access, binds[0].recursive), (1, Access::ReadOnly, true));
        assert_eq!((binds[1].index, binds[1].access, binds[1].destination.as_str()), (3, Access::ReadWrite, "/data"));
        let g = s.for_guest("c1", &GuestSubmounts::new());
        assert_eq!(g.pointer("/root/path").unwrap(), "/run/wisp/shared/c1/rootfs");
        assert_eq!(g.pointer("/root/readonly").unwrap(), true);
        assert_eq!(g.pointer("/mounts/1/source").unwrap(), "/run/wisp/shared/c1/mounts/1");
        assert_eq!(g.pointer("/mounts/2/type").unwrap(), "tmpfs");
        assert_eq!(g.pointer("/mounts/3/source").unwrap(), "/run/wisp/shared/c1/mounts/3");
        assert_eq!(g.pointer("/mounts/0/source").unwrap(), "proc");
    }

    /// containerd 2 writes `rro` without `ro` for a recursive read-only volume: the host
    /// side of the share is read-only for it too, and the option reaches the guest.
    #[test]
    fn recursive_read_only_binds_are_read_only_binds() {
        let s = spec(serde_json::json!({ "mounts": [
            { "destination": "/rro", "type": "bind", "source": "/srv/a", "options": ["rbind", "rprivate", "rro"] }
        ] }));
        assert_eq!(s.binds[0].access, Access::RecursiveReadOnly);
        assert_eq!(s.for_guest("c1", &GuestSubmounts::new()).pointer("/mounts/0/options/2").unwrap(), "rro");
    }

    #[test]
    fn a_plain_bind_does_not_bring_submounts() {
        let s = spec(serde_json::json!({ "mounts": [
            { "destination": "/a", "type": "bind", "source": "/srv/a", "options": ["bind", "ro"] }
        ] }));
        assert_eq!((s.binds[0].access, s.binds[0].recursive), (Access::ReadOnly, false));
    }

    /// A writable mount below a read-only volume gets a writable bind of its own in the
    /// guest, right after the volume's, and a read-only one below that its own again.
    #[test]
    fn submounts_follow_their_bind_in_the_guest_spec() {
        let s = spec(serde_json::json!({}));
        let subs = GuestSubmounts::from([(
            1,
            vec![
                GuestSubmount { path: "tmp fs".into(), read_only: false },
                GuestSubmount { path: "tmp fs/deep".into(), read_only: true },
            ],
        )]);
        let g = s.for_guest("c1", &subs);
        let mounts = g["mounts"].as_array().unwrap();
        assert_eq!(mounts.len(), 6);
        assert_eq!(mounts[1]["destination"], "/etc/hosts");
        assert_eq!(mounts[2]["destination"], "/etc/hosts/tmp fs");
        assert_eq!(mounts[2]["source"], "/run/wisp/shared/c1/mounts/1/tmp fs");
        assert_eq!(mounts[2]["options"], serde_json::json!(["rbind", "rw"]));
        assert_eq!(mounts[3]["destination"], "/etc/hosts/tmp fs/deep");
        assert_eq!(mounts[3]["options"], serde_json::json!(["rbind", "ro"]));
        assert_eq!(mounts[4]["type"], "tmpfs");
        assert_eq!(mounts[5]["source"], "/run/wisp/shared/c1/mounts/3", "later binds keep their share entry");
    }

    #[test]
    fn malformed_specs_are_errors() {
        assert!(BundleSpec::parse(b"{", "b/config.json").unwrap_err().to_string().contains("b/config.json"));
        assert!(BundleSpec::parse(b"[]", "x").is_err());
        assert!(BundleSpec::parse(b"{\"root\":{}}", "x").unwrap_err().to_string().contains("process"));
        let dir = tempfile::tempdir().unwrap();
        assert!(BundleSpec::load(dir.path()).unwrap_err().to_string().contains("config.json"));
        // What the shim reads of it is checked once, when it is loaded.
        let bad_hooks = br#"{"process":{},"hooks":{"poststop":"x"}}"#;
        let e = BundleSpec::parse(bad_hooks, "b/config.json").unwrap_err().to_string();
        assert!(e.contains("b/config.json") && e.contains("poststop"), "{e}");
        let bad_netns = br#"{"process":{},"linux":{"namespaces":[{"type":"network","path":"rel"}]}}"#;
        let e = BundleSpec::parse(bad_netns, "b/config.json").unwrap_err().to_string();
        assert!(e.contains("b/config.json") && e.contains("not absolute"), "{e}");
    }

    #[test]
    fn what_the_shim_uses_is_read_once() {
        let text = br#"{"process":{},"hostname":"h1","root":{"path":"/abs/root"},
            "annotations":{"a":"1","n":2},
            "linux":{"cgroupsPath":"/kubepods/p1/c1","namespaces":[{"type":"network","path":"/var/run/netns/n1"}]},
            "hooks":{"createRuntime":[{"path":"/bin/true"}]}}"#;
        let s = BundleSpec::parse(text, "x").unwrap();
        assert_eq!((s.hostname.as_str(), s.cgroups_path.as_deref()), ("h1", Some("/kubepods/p1/c1")));
        assert_eq!(s.annotations, HashMap::from([("a".to_string(), "1".to_string())]), "non-strings are dropped");
        assert_eq!(s.netns.as_deref(), Some(Path::new("/var/run/netns/n1")));
        assert!(!s.hooks.is_empty());
        assert_eq!(s.root_path(Path::new("/b")), PathBuf::from("/abs/root"));
    }
}
