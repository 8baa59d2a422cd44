//! OCI runtime hooks that run on the host. The container's processes run in the guest,
//! so only the hooks whose place is the runtime's (not the container's) namespace run,
//! here, in the shim: `createRuntime` (and the deprecated `prestart`, which runc runs at
//! the same point) before the pod's VM boots, `poststop` after it is gone. The guest's
//! agent drops the spec's hooks (their programs are host paths).
//!
//! This is how nerdctl networks a container: its `createRuntime` hook runs CNI in the
//! container's network namespace, its `poststop` hook undoes it. For a spec that asks for
//! a fresh network namespace and has such hooks, the shim makes that namespace on the host
//! (`PodNetns`, bind-mounted in the sandbox's state directory), names it in the hook
//! state's `nerdctl/network-namespace` annotation (the key nerdctl's hook reads for VM
//! runtimes, whose state has no pid in the namespace), and after the hooks reads the
//! pod's interfaces from it like a CRI pod's.
//!
//! The hooks come from the container's spec, which containerd's client wrote: the same
//! trust runc gives them (it runs them as root, too). Nothing of the guest's reaches them.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A hook without a `timeout` gets this long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// The most of a failed hook's output an error quotes.
const OUTPUT_QUOTED: usize = 2048;
/// The annotation nerdctl's hook takes the network namespace from.
pub const NETNS_ANNOTATION: &str = "nerdctl/network-namespace";

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("hooks.{kind}[{index}]: {reason}")]
    Spec { kind: &'static str, index: usize, reason: String },
    #[error("hooks.{kind}[{index}] ({path}): {reason}")]
    Failed { kind: &'static str, index: usize, path: String, reason: String },
    #[error("the pod's network namespace {path}: {reason}")]
    Netns { path: String, reason: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hook {
    path: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    timeout: Duration,
}

/// The host-side hooks of a spec.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hooks {
    /// `prestart` then `createRuntime`, in the spec's order.
    pub create_runtime: Vec<Hook>,
    pub poststop: Vec<Hook>,
}

impl Hooks {
    /// Reads `hooks` from a spec; a malformed entry is an error naming it.
    pub fn from_spec(spec: &Value) -> Result<Self, HookError> {
        let list = |kind: &'static str| -> Result<Vec<Hook>, HookError> {
            match spec.pointer(&format!("/hooks/{kind}")) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(a)) => a.iter().enumerate().map(|(i, h)| parse_hook(kind, i, h)).collect(),
                Some(other) => Err(HookError::Spec { kind, index: 0, reason: format!("not a list: {other}") }),
            }
        };
        let mut create_runtime = list("prestart")?;
        create_runtime.extend(list("createRuntime")?);
        Ok(Self { create_runtime, poststop: list("poststop")? })
    }

    pub fn is_empty(&self) -> bool {
        self.create_runtime.is_empty() && self.poststop.is_empty()
    }
}

fn parse_hook(kind: &'static str, index: usize, h: &Value) -> Result<Hook, HookError> {
    let bad = |reason: String| HookError::Spec { kind, index, reason };
    let path = h.get("path").and_then(Value::as_str).ok_or_else(|| bad("no path".into()))?;
    if !path.starts_with('/') {
        return Err(bad(format!("path {path:?} is not absolute")));
    }
    let strings = |key: &str| -> Result<Vec<String>, HookError> {
        match h.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad(format!("{key} has a non-string: {v}"))))
                .collect(),
            Some(other) => Err(bad(format!("{key} is not a list: {other}"))),
        }
    };
    let env = strings("env")?
        .into_iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(bad(format!("env entry {kv:?} is not KEY=VALUE"))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = match h.get("timeout") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT,
        Some(v) => match v.as_u64() {
            Some(s) if s > 0 => Duration::from_secs(s),
            _ => return Err(bad(format!("timeout {v} is not a positive number of seconds"))),
        },
    };
    Ok(Hook { path: path.into(), args: strings("args")?, env, timeout })
}

/// The state a hook reads on its stdin (OCI runtime spec "State"): no pid, as the
/// container's processes are in the guest; the network namespace, if the shim made one,
/// as `NETNS_ANNOTATION`.
pub fn state(id: &str, status: &str, bundle: &Path, spec: &Value, netns: Option<&Path>) -> Value {
    let mut annotations = spec.get("annotations").cloned().filter(Value::is_object).unwrap_or_else(|| json!({}));
    if let Some(ns) = netns {
        annotations[NETNS_ANNOTATION] = json!(ns.display().to_string());
    }
    json!({
        "ociVersion": spec.get("ociVersion").and_then(Value::as_str).unwrap_or("1.0.2"),
        "id": id,
        "status": status,
        "bundle": bundle.display().to_string(),
        "annotations": annotations,
    })
}

/// Runs `hooks` in order with `state` on stdin; the first that fails (non-zero exit,
/// or still running at its timeout: then it is killed) ends the run with its error.
pub fn run(kind: &'static str, hooks: &[Hook], state: &Value) -> Result<(), HookError> {
    let input = serde_json::to_vec(state).unwrap_or_default();
    for (index, h) in hooks.iter().enumerate() {
        let failed = |reason: String| HookError::Failed { kind, index, path: h.path.display().to_string(), reason };
        let mut cmd = Command::new(&h.path);
        if let Some((arg0, rest)) = h.args.split_first() {
            cmd.arg0(arg0).args(rest);
        }
        cmd.env_clear().envs(h.env.iter().map(|(k, v)| (k, v)));
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Its own process group: a timeout kills the hook and whatever it started (which
        // would otherwise keep its output pipes open).
        cmd.process_group(0);
        let mut child = cmd.spawn().map_err(|e| failed(format!("cannot start it: {e}")))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A hook that does not read its state is not an error (EPIPE).
            let _ = stdin.write_all(&input);
        }
        // Output is read on threads so a chatty hook cannot block on a full pipe.
        let read = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut out = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut out);
                }
                out
            })
        };
        let out = read(child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
        let err = read(child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>));
        let deadline = Instant::now() + h.timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() >= deadline => {
                    // SAFETY: kill(2) on the process group the hook leads.
                    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(failed(format!("waiting for it: {e}"))),
            }
        };
        let quoted = |b: Vec<u8>| {
            let t = String::from_utf8_lossy(&b).trim().to_string();
            t.chars().take(OUTPUT_QUOTED).collect::<String>()
        };
        let (out, err) = (quoted(out.join().unwrap_or_default()), quoted(err.join().unwrap_or_default()));
        match status {
            None => return Err(failed(format!("still running after {:?}: killed; stderr: {err:?}", h.timeout))),
            Some(s) if !s.success() => return Err(failed(format!("{s}; stdout: {out:?}; stderr: {err:?}"))),
            Some(_) => log::info!("hooks.{kind}[{index}] ({}) ran", h.path.display()),
        }
    }
    Ok(())
}

/// A network namespace the shim made for a pod (bind-mounted on a file in the
/// sandbox's host-only state directory); unmounted and removed on drop.
#[derive(Debug)]
pub struct PodNetns {
    path: PathBuf,
}

impl PodNetns {
    pub fn create(path: &Path) -> Result<Self, HookError> {
        let err = |reason: String| HookError::Netns { path: path.display().to_string(), reason };
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| err(format!("creating the mount point: {e}")))?;
        let me = Self { path: path.to_path_buf() };
        let target = path.to_path_buf();
        // A thread of its own enters the new namespace; the shim's threads stay put.
        let made = std::thread::spawn(move || -> std::io::Result<()> {
            // SAFETY: unshare(2) affects only this thread, which ends right after.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(std::io::Error::from)
        })
        .join()
        .map_err(|_| err("the thread making it panicked".into()))?;
        made.map_err(|e| err(format!("making it: {e}")))?;
        Ok(me)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        let _ =
            nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW);
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("removing {}: {e}", self.path.display());
            }
        }
    }
}

/// A pod's host-side hooks once `createRuntime` ran: at teardown `finish` runs
/// `poststop` and then removes the network namespace the shim made, if it made one.
pub struct PodHooks {
    poststop: Vec<Hook>,
    /// The state `createRuntime` got; `poststop` gets it with status "stopped".
    state: Value,
    netns: Option<PodNetns>,
}

impl PodHooks {
    /// Makes the pod's network namespace if the spec wants a fresh one (at `netns_at`),
    /// then runs the `createRuntime` hooks. On error what was done is undone (`poststop`
    /// runs, as the OCI runtime spec asks after a failed `createRuntime`).
    pub fn start(
        hooks: Hooks,
        id: &str,
        bundle: &Path,
        spec: &Value,
        netns_at: Option<&Path>,
    ) -> Result<Self, HookError> {
        let netns = match netns_at {
            Some(p) if wants_fresh_netns(spec) => Some(PodNetns::create(p)?),
            _ => None,
        };
        let state = state(id, "creating", bundle, spec, netns.as_ref().map(|n| n.path()));
        let me = Self { poststop: hooks.poststop, state, netns };
        if let Err(e) = run("createRuntime", &hooks.create_runtime, &me.state) {
            me.finish();
            return Err(e);
        }
        Ok(me)
    }

    /// The network namespace the shim made for the pod, if it made one.
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_ref().map(PodNetns::path)
    }

    /// Runs `poststop` (a failure is logged: the pod goes anyway), then removes the
    /// network namespace.
    pub fn finish(mut self) {
        self.state["status"] = json!("stopped");
        if let Err(e) = run("poststop", &self.poststop, &self.state) {
            log::warn!("{e}");
        }
        drop(self.netns.take());
    }
}

/// Whether the spec asks for a fresh network namespace (a `network` entry without a
/// path): the runtime makes it.
pub fn wants_fresh_netns(spec: &Value) -> bool {
    spec.pointer("/linux/namespaces").and_then(Value::as_array).is_some_and(|l| {
        l.iter().any(|n| {
            n.get("type").and_then(Value::as_str) == Some("network")
                && n.get("path").and_then(Value::as_str).is_none_or(str::is_empty)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(hooks: Value) -> Value {
        json!({"ociVersion": "1.1.0", "annotations": {"a": "b"}, "hooks": hooks})
    }

    #[test]
    fn parses_prestart_then_create_runtime_and_poststop() {
        let h = Hooks::from_spec(&spec(json!({
            "prestart": [{"path": "/bin/p"}],
            "createRuntime": [{"path": "/bin/c", "args": ["c", "x"], "env": ["K=V=W"], "timeout": 5}],
            "createContainer": [{"path": "/in/the/guest"}],
            "poststop": [{"path": "/bin/s"}]
        })))
        .unwrap();
        assert_eq!(h.create_runtime.len(), 2);
        assert_eq!(h.create_runtime[0].path, PathBuf::from("/bin/p"));
        assert_eq!(h.create_runtime[1].args, ["c", "x"]);
        assert_eq!(h.create_runtime[1].env, [("K".to_string(), "V=W".to_string())]);
        assert_eq!(h.create_runtime[1].timeout, Duration::from_secs(5));
        assert_eq!(h.poststop.len(), 1);
        assert!(Hooks::from_spec(&json!({})).unwrap().is_empty());
    }

    #[test]
    fn malformed_hooks_are_clear_errors() {
        for (hooks, want) in [
            (json!({"createRuntime": {"path": "/x"}}), "not a list"),
            (json!({"createRuntime": [{"args": []}]}), "no path"),
            (json!({"createRuntime": [{"path": "rel"}]}), "not absolute"),
            (json!({"poststop": [{"path": "/x", "args": [1]}]}), "non-string"),
            (json!({"poststop": [{"path": "/x", "env": ["NOEQ"]}]}), "KEY=VALUE"),
            (json!({"prestart": [{"path": "/x", "timeout": 0}]}), "positive"),
        ] {
            let e = Hooks::from_spec(&spec(hooks.clone())).unwrap_err().to_string();
            assert!(e.contains(want), "{hooks}: {e}");
        }
    }

    #[test]
    fn state_names_the_netns_and_keeps_annotations() {
        let s = state("c1", "creating", Path::new("/b"), &spec(json!({})), Some(Path::new("/run/wisp/s/netns")));
        assert_eq!(s["id"], "c1");
        assert_eq!(s["status"], "creating");
        assert_eq!(s["annotations"]["a"], "b");
        assert_eq!(s["annotations"][NETNS_ANNOTATION], "/run/wisp/s/netns");
        assert!(s.get("pid").is_none());
        assert_eq!(s["ociVersion"], "1.1.0");
    }

    #[test]
    fn hooks_get_their_state_args_env_and_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let h = Hook {
            path: "/bin/sh".into(),
            args: vec!["sh".into(), "-c".into(), format!("cat > {}; echo \"$K\" >> {}", out.display(), out.display())],
            env: vec![("K".into(), "v".into())],
            timeout: Duration::from_secs(10),
        };
        let st = json!({"id": "x"});
        run("createRuntime", std::slice::from_ref(&h), &st).unwrap();
        let got = std::fs::read_to_string(&out).unwrap();
        assert_eq!(got, "{\"id\":\"x\"}v\n");

        let fail = Hook { args: vec!["sh".into(), "-c".into(), "echo nope >&2; exit 3".into()], ..h.clone() };
        let e = run("poststop", &[fail], &st).unwrap_err().to_string();
        assert!(e.contains("hooks.poststop[0]") && e.contains("nope") && e.contains('3'), "{e}");

        let slow =
            Hook { args: vec!["sh".into(), "-c".into(), "sleep 30".into()], timeout: Duration::from_secs(1), ..h };
        // Killed at its 1 s timeout, not left to end: `sleep 30` would end on its own at
        // 30 s, so returning before that is the functional check, not a speed claim.
        let t = Instant::now();
        let e = run("createRuntime", &[slow], &st).unwrap_err().to_string();
        let took = t.elapsed();
        eprintln!("the slow hook was ended after {took:?}");
        assert!(e.contains("killed") && took < Duration::from_secs(30), "{e} (after {took:?})");

        let missing = Hook { path: "/nonexistent/hook".into(), args: vec![], env: vec![], timeout: DEFAULT_TIMEOUT };
        let e = run("createRuntime", &[missing], &st).unwrap_err().to_string();
        assert!(e.contains("cannot start"), "{e}");
    }

    #[test]
    fn fresh_netns_is_a_network_entry_without_path() {
        let ns = |l: Value| json!({"linux": {"namespaces": l}});
        assert!(wants_fresh_netns(&ns(json!([{"type": "network"}]))));
        assert!(wants_fresh_netns(&ns(json!([{"type": "network", "path": ""}]))));
        assert!(!wants_fresh_netns(&ns(json!([{"type": "network", "path": "/var/run/netns/x"}]))));
        assert!(!wants_fresh_netns(&ns(json!([{"type": "pid"}]))));
        assert!(!wants_fresh_netns(&json!({})));
    }

    #[test]
    #[ignore = "needs root (unshare, mount)"]
    fn pod_netns_is_made_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("netns");
        let ns = PodNetns::create(&p).unwrap();
        let host = std::fs::read_link("/proc/self/ns/net").unwrap();
        let made = nix::sys::stat::stat(&p).unwrap();
        let mine = nix::sys::stat::stat("/proc/self/ns/net").unwrap();
        assert_ne!(made.st_ino, mine.st_ino, "not a new namespace (host {host:?})");
        drop(ns);
        assert!(!p.exists());
    }

    #[test]
    #[ignore = "needs root (unshare, mount)"]
    fn a_failing_create_runtime_hook_undoes_everything() {
        // The hook fails: its error comes back, poststop ran, the namespace is gone.
        let dir = tempfile::tempdir().unwrap();
        let ns = dir.path().join("netns");
        let marker = dir.path().join("poststop-ran");
        let spec = json!({"linux": {"namespaces": [{"type": "network"}]}});
        let hooks = Hooks {
            create_runtime: vec![Hook {
                path: "/bin/sh".into(),
                args: vec!["sh".into(), "-c".into(), "echo cni failed >&2; exit 1".into()],
                env: vec![],
                timeout: Duration::from_secs(10),
            }],
            poststop: vec![Hook {
                path: "/bin/sh".into(),
                args: vec!["sh".into(), "-c".into(), format!("touch {}", marker.display())],
                env: vec![],
                timeout: Duration::from_secs(10),
            }],
        };
        let e = PodHooks::start(hooks, "c1", dir.path(), &spec, Some(&ns)).err().expect("the hook failed");
        assert!(e.to_string().contains("cni failed"), "{e}");
        assert!(marker.exists(), "poststop did not run after the failed createRuntime");
        assert!(!ns.exists(), "the network namespace was left behind");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mounts.contains(&ns.display().to_string()), "its mount was left behind");
    }
}
