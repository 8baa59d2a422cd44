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

/// A bundle's `config.json`, kept as JSON so every field containerd set survives.
#[derive(Debug, Clone)]
pub struct BundleSpec {
    pub json: Value,
}

impl BundleSpec {
    pub fn load(bundle: &Path) -> Result<Self, SpecError> {
        let path = bundle.join("config.json");
        let p = path.display().to_string();
        let text = std::fs::read(&path).map_err(|source| SpecError::Read { path: p.clone(), source })?;
        Self::parse(&text, &p)
    }

    pub fn parse(text: &[u8], origin: &str) -> Result<Self, SpecError> {
        let json: Value = serde_json::from_slice(text)
            .map_err(|e| SpecError::Invalid { path: origin.into(), reason: e.to_string() })?;
        if !json.is_object() {
            return Err(SpecError::Invalid { path: origin.into(), reason: "not a JSON object".into() });
        }
        if json.pointer("/process").is_none_or(|p| !p.is_object()) {
            return Err(SpecError::Invalid { path: origin.into(), reason: "no process section".into() });
        }
        Ok(Self { json })
    }

    pub fn annotations(&self) -> HashMap<String, String> {
        self.json
            .get("annotations")
            .and_then(Value::as_object)
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default()
    }

    /// The pod this container belongs to: the CRI sandbox-id annotation, else itself.
    pub fn sandbox_id(&self, container_id: &str) -> String {
        self.annotations().get(SANDBOX_ID_ANNOTATION).cloned().unwrap_or_else(|| container_id.to_string())
    }

    /// True unless CRI says this is an application container of a pod.
    pub fn is_sandbox_container(&self) -> bool {
        self.annotations().get(CONTAINER_TYPE_ANNOTATION).is_none_or(|t| t != "container")
    }

    pub fn hostname(&self) -> String {
        self.json.get("hostname").and_then(Value::as_str).unwrap_or_default().to_string()
    }

    /// The spec's `root.path`, resolved against the bundle when relative.
    pub fn root_path(&self, bundle: &Path) -> PathBuf {
        let p = self.json.pointer("/root/path").and_then(Value::as_str).unwrap_or("rootfs");
        bundle.join(p)
    }

    /// The bind mounts that must be shared into the guest, in spec order.
    pub fn shared_binds(&self) -> Vec<SharedBind> {
        let mut out = Vec::new();
        for (index, m) in self.mounts().iter().enumerate() {
            if !is_bind(m) {
                continue;
            }
            let Some(dest) = m.get("destination").and_then(Value::as_str) else { continue };
            if dest == "/dev/shm" {
                continue;
            }
            let Some(source) = m.get("source").and_then(Value::as_str) else { continue };
            // `rro` (recursive read-only, containerd 2 with the handler's features) is read-only
            // on the host side of the share too.
            let read_only = options(m).iter().any(|o| o == "ro" || o == "rro");
            out.push(SharedBind { index, source: PathBuf::from(source), destination: dest.to_string(), read_only });
        }
        out
    }

    fn mounts(&self) -> Vec<Value> {
        self.json.get("mounts").and_then(Value::as_array).cloned().unwrap_or_default()
    }

    /// The spec the agent gets: rootfs and shared binds at their guest paths under the
    /// container's directory on the share, `/dev/shm` as a tmpfs.
    pub fn for_guest(&self, container_id: &str) -> Value {
        let mut spec = self.json.clone();
        let cdir = format!("{GUEST_SHARED_DIR}/{container_id}");
        if let Some(root) = spec.get_mut("root").and_then(Value::as_object_mut) {
            root.insert("path".into(), Value::String(format!("{cdir}/rootfs")));
        } else if let Some(obj) = spec.as_object_mut() {
            obj.insert("root".into(), serde_json::json!({ "path": format!("{cdir}/rootfs") }));
        }
        let binds: HashMap<usize, SharedBind> = self.shared_binds().into_iter().map(|b| (b.index, b)).collect();
        if let Some(mounts) = spec.get_mut("mounts").and_then(Value::as_array_mut) {
            for (i, m) in mounts.iter_mut().enumerate() {
                if m.get("destination").and_then(Value::as_str) == Some("/dev/shm") {
                    *m = serde_json::json!({
                        "destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                        "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]
                    });
                } else if let Some(b) = binds.get(&i) {
                    if let Some(obj) = m.as_object_mut() {
                        obj.insert("source".into(), Value::String(format!("{cdir}/{}", b.share_name())));
                    }
                }
            }
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

/// A host path the container bind-mounts, and where it goes on the share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedBind {
    /// Position in the spec's mounts (names the share entry, so it is unique).
    pub index: usize,
    pub source: PathBuf,
    pub destination: String,
    pub read_only: bool,
}

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
        let binds = s.shared_binds();
        assert_eq!(binds.len(), 2);
        assert_eq!((binds[0].index, binds[0].read_only), (1, true));
        assert_eq!((binds[1].index, binds[1].read_only, binds[1].destination.as_str()), (3, false, "/data"));
        let g = s.for_guest("c1");
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
        assert!(s.shared_binds()[0].read_only);
        assert_eq!(s.for_guest("c1").pointer("/mounts/0/options/2").unwrap(), "rro");
    }

    #[test]
    fn malformed_specs_are_errors() {
        assert!(BundleSpec::parse(b"{", "b/config.json").unwrap_err().to_string().contains("b/config.json"));
        assert!(BundleSpec::parse(b"[]", "x").is_err());
        assert!(BundleSpec::parse(b"{\"root\":{}}", "x").unwrap_err().to_string().contains("process"));
        let dir = tempfile::tempdir().unwrap();
        assert!(BundleSpec::load(dir.path()).unwrap_err().to_string().contains("config.json"));
    }
}
