//! The pod's network namespace: where it is (the sandbox's OCI spec) and running code
//! inside it.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{NetworkError, Result};

/// The pod's network namespace from the sandbox container's spec: the `path` of the
/// `linux.namespaces` entry of type `network`. None when there is no such entry (host
/// network) or it has no path (a fresh namespace: the pod has no network but loopback).
pub fn netns_path(spec: &Value) -> Result<Option<PathBuf>> {
    let Some(namespaces) = spec.pointer("/linux/namespaces") else { return Ok(None) };
    if namespaces.is_null() {
        return Ok(None);
    }
    let bad = |why: String| NetworkError::Spec(why);
    let list = namespaces.as_array().ok_or_else(|| bad(format!("linux.namespaces is not a list: {namespaces}")))?;
    let mut found: Option<Option<PathBuf>> = None;
    for ns in list {
        let entry =
            ns.as_object().ok_or_else(|| bad(format!("linux.namespaces has an entry that is not an object: {ns}")))?;
        if entry.get("type").and_then(Value::as_str) != Some("network") {
            continue;
        }
        if found.is_some() {
            return Err(bad("linux.namespaces has more than one network namespace".into()));
        }
        found = Some(match entry.get("path") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => {
                let p = PathBuf::from(s);
                if !p.is_absolute() {
                    return Err(bad(format!("the network namespace path {s:?} is not absolute")));
                }
                Some(p)
            }
            Some(other) => return Err(bad(format!("the network namespace path is not a string: {other}"))),
        });
    }
    Ok(found.flatten())
}
/// Runs `f` on a new thread that has entered the network namespace at `netns`; the
/// thread ends with `f`, so no thread of the shim is ever left in the pod's namespace.
pub fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let path = netns.to_path_buf();
    let shown = netns.display().to_string();
    let netns_error = move |reason: String| NetworkError::Netns { path: shown.clone(), reason };
    let err = netns_error.clone();
    let thread = std::thread::Builder::new()
        .name("wisp-netns".into())
        .spawn(move || {
            let file = File::open(&path).map_err(|e| err(e.to_string()))?;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                err(match e {
                    nix::errno::Errno::EINVAL => "not a network namespace".to_string(),
                    e => format!("entering it: {e}"),
                })
            })?;
            drop(file);
            f()
        })
        .map_err(|e| netns_error(format!("starting a thread for it: {e}")))?;
    thread.join().map_err(|_| NetworkError::Other(format!("the thread working in {} panicked", netns.display())))?
}
#[cfg(test)]
mod tests {
    use super::*;
    fn spec(namespaces: Value) -> Value {
        serde_json::json!({ "process": {}, "linux": { "namespaces": namespaces } })
    }

    #[test]
    fn the_netns_path_comes_from_the_network_namespace_entry() {
        let cri = spec(serde_json::json!([
            { "type": "pid" }, { "type": "ipc" },
            { "type": "network", "path": "/var/run/netns/cni-1234" }, { "type": "mount" }
        ]));
        assert_eq!(netns_path(&cri).unwrap(), Some(PathBuf::from("/var/run/netns/cni-1234")));
        // ctr without networking: a fresh namespace; host network: no entry at all.
        assert_eq!(netns_path(&spec(serde_json::json!([{ "type": "network" }]))).unwrap(), None);
        assert_eq!(netns_path(&spec(serde_json::json!([{ "type": "network", "path": "" }]))).unwrap(), None);
        assert_eq!(netns_path(&spec(serde_json::json!([{ "type": "pid" }]))).unwrap(), None);
        assert_eq!(netns_path(&serde_json::json!({ "process": {} })).unwrap(), None);
        assert_eq!(netns_path(&serde_json::json!({ "process": {}, "linux": {} })).unwrap(), None);
        assert_eq!(netns_path(&spec(Value::Null)).unwrap(), None);
    }

    #[test]
    fn malformed_namespace_lists_are_errors() {
        let cases = [
            (serde_json::json!({ "type": "network" }), "not a list"),
            (serde_json::json!(["network"]), "not an object"),
            (serde_json::json!([{ "type": "network", "path": 7 }]), "not a string"),
            (serde_json::json!([{ "type": "network", "path": "netns/x" }]), "not absolute"),
            (
                serde_json::json!([{ "type": "network", "path": "/a" }, { "type": "network", "path": "/b" }]),
                "more than one",
            ),
        ];
        for (namespaces, want) in cases {
            let e = netns_path(&spec(namespaces.clone())).unwrap_err();
            assert!(matches!(e, NetworkError::Spec(_)), "{namespaces}: {e}");
            assert!(e.to_string().contains(want), "{namespaces}: {e}");
        }
    }
}
