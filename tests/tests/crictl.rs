//! `crictl` (cri-tools, built by tests/tools/go-tools.sh) against containerd's CRI plugin
//! with runtime handler `wisp`: the README's walk-through as a user types it (runp,
//! create, start, ps, exec, logs, stats, inspectp/inspect, stop, stopp, rmp), attach and
//! interactive exec, and a pod on a CNI network (containerd 2's default pod sysctls in the
//! guest). Each case checks the host afterwards: no VMM, shim, state or
//! mount of the pod left.
//!
//! Runs against the containerd that `WISP_CONTAINERD_BIN` selects (`tests/e2e.sh
//! crictl@2.4`); with Debian's 1.6 too.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use wisp_tests::cni::{conflist, http_get, need_cni};
use wisp_tests::containerd::{need_containerd, wisp_config, Containerd};
use wisp_tests::harness::{need_full_kvm, need_root, CaseResult, Outcome, Suite};
use wisp_tests::image::BUSYBOX_IMAGE;
use wisp_tests::process::output_within;
use wisp_tests::procs::{all_vmm_pids, host_kernel, vmm_pids, wait_pod_gone};
use wisp_tests::rootfs::need_busybox;
use wisp_tests::{ensure_that, go_tool, need_built, skip_unless};

const DEBUG: &str = "[runtime]\ndebug = true\n";
/// How long a crictl command may take (pod VMs boot slowly under TCG).
const TIMEOUT: Duration = Duration::from_secs(300);
/// Teardown continues after a CRI call returns.
const SETTLE: Duration = Duration::from_secs(120);

fn need_artifacts() -> Option<String> {
    need_built(&["release/containerd-shim-wisp-v2", "release/wisp-vmm", "guest/vmlinux", "guest/initrd.img"])
}

fn need_crictl() -> Option<String> {
    go_tool("cri-tools", "crictl").err()
}

macro_rules! skip_unless_ready {
    ($($extra:expr),*) => {
        skip_unless!(need_root(), need_containerd(), need_busybox(), need_artifacts(), need_crictl(), need_full_kvm() $(, $extra)*)
    };
}

struct Env {
    c: Containerd,
    crictl: PathBuf,
    config: PathBuf,
    scratch: tempfile::TempDir,
    passed: std::cell::Cell<bool>,
}

/// A finished crictl command.
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn env(cni: bool) -> anyhow::Result<Env> {
    let c = if cni {
        wisp_tests::cni::reset();
        Containerd::start_with_cni(&wisp_config(DEBUG), &[("10-wisp-cri-net.conflist", &conflist())])?
    } else {
        Containerd::start(&wisp_config(DEBUG))?
    };
    c.import_cri_images()?;
    let crictl = go_tool("cri-tools", "crictl").map_err(anyhow::Error::msg)?;
    let scratch = tempfile::Builder::new().prefix("wisp-crictl-").tempdir()?;
    let config = scratch.path().join("crictl.yaml");
    let endpoint = format!("unix://{}", c.socket.display());
    std::fs::write(
        &config,
        format!("runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: {}\n", TIMEOUT.as_secs()),
    )?;
    let e = Env { c, crictl, config, scratch, passed: Default::default() };
    // The CRI plugin learns about imported images (and a network) asynchronously.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let images = e.crictl(&["images", "-q"], None)?;
        let info = e.crictl(&["info"], None)?;
        let net_ready = !cni || info.stdout.contains("\"NetworkReady\"") && network_ready(&info.stdout);
        if images.stdout.lines().count() >= 2 && net_ready {
            break;
        }
        ensure_that!(Instant::now() < deadline, "after 60 s: images {:?}, info {}", images.stdout, info.stdout);
        std::thread::sleep(Duration::from_millis(200));
    }
    let v = e.ok(&["version"])?;
    eprintln!("crictl: {}", v.replace('\n', "; "));
    Ok(e)
}

/// `crictl info`'s NetworkReady condition.
fn network_ready(info: &str) -> bool {
    let v: Value = serde_json::from_str(info).unwrap_or_default();
    v["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "NetworkReady" && c["status"] == true))
}

impl Env {
    fn crictl(&self, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Out> {
        eprintln!("+ crictl {}", args.join(" "));
        let mut cmd = std::process::Command::new(&self.crictl);
        cmd.arg("--config").arg(&self.config).args(args);
        let out = output_within(&mut cmd, stdin, TIMEOUT + Duration::from_secs(30))
            .with_context(|| format!("crictl {args:?}\n{}", self.c.diagnostics()))?;
        Ok(Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// A crictl command that must succeed; its trimmed stdout.
    fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        self.ok_with(args, None)
    }

    fn ok_with(&self, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<String> {
        let o = self.crictl(args, stdin)?;
        if o.code != 0 {
            bail!("crictl {args:?} exited {}: {}\n{}", o.code, o.stderr.trim(), self.c.diagnostics());
        }
        Ok(o.stdout.trim().to_string())
    }

    fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let text = self.ok(args)?;
        serde_json::from_str(&text).with_context(|| format!("crictl {args:?} printed no JSON: {text}"))
    }

    /// Writes a config file for crictl; its path.
    fn file(&self, name: &str, v: &Value) -> anyhow::Result<String> {
        let p = self.scratch.path().join(name);
        std::fs::write(&p, serde_json::to_vec_pretty(v)?)?;
        Ok(p.display().to_string())
    }

    /// A pod config (host network unless `own_netns`) with its log directory.
    fn pod(&self, name: &str, own_netns: bool) -> anyhow::Result<String> {
        let logs = self.scratch.path().join("logs").join(name);
        std::fs::create_dir_all(&logs)?;
        // A cgroup parent as the kubelet gives every pod (containerd reads the pod's
        // stats for `statsp` from it: on the host, where wisp's VMM runs).
        let mut pod = json!({
            "metadata": {"name": name, "namespace": "wisp-test", "uid": format!("{name}-uid"), "attempt": 1},
            "log_directory": logs,
            "linux": {"cgroup_parent": format!("/wisp-crictl/{name}")}
        });
        if !own_netns {
            pod["linux"]["security_context"] = json!({"namespace_options": {"network": 2}});
        } else {
            pod["hostname"] = json!(name);
        }
        self.file(&format!("{name}-pod.json"), &pod)
    }

    fn container(&self, name: &str, command: &[&str], extra: Value) -> anyhow::Result<String> {
        let mut c = json!({
            "metadata": {"name": name},
            "image": {"image": BUSYBOX_IMAGE},
            "command": command,
            "log_path": format!("{name}.log"),
            "linux": {}
        });
        if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                c.insert(k.clone(), v.clone());
            }
        }
        self.file(&format!("{name}-container.json"), &c)
    }

    /// `crictl runp --runtime wisp`; the pod id.
    fn runp(&self, pod: &str) -> anyhow::Result<String> {
        let t = Instant::now();
        let id = self.ok(&["runp", "--runtime", "wisp", pod])?;
        eprintln!("crictl: pod {id} ready after {:.1}s", t.elapsed().as_secs_f64());
        Ok(id)
    }

    /// `crictl create` + `crictl start`; the container id.
    fn create_start(&self, pod_id: &str, container: &str, pod: &str) -> anyhow::Result<String> {
        let id = self.ok(&["create", pod_id, container, pod])?;
        self.ok(&["start", &id])?;
        Ok(id)
    }

    fn state(&self, cid: &str) -> anyhow::Result<String> {
        Ok(self.json(&["inspect", cid])?["status"]["state"].as_str().unwrap_or_default().to_string())
    }

    fn wait_state(&self, cid: &str, want: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let s = self.state(cid)?;
            if s == want {
                return Ok(());
            }
            ensure_that!(Instant::now() < deadline, "container {cid} is {s}, not {want}, after {SETTLE:?}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// `crictl stopp` + `crictl rmp`, then nothing of the pod's VM may be left.
    fn remove_pod(&self, sid: &str) -> anyhow::Result<()> {
        self.ok(&["stopp", sid])?;
        self.ok(&["rmp", sid])?;
        let pods = self.ok(&["pods", "-q"])?;
        ensure_that!(!pods.contains(sid), "pod {sid} still listed after rmp: {pods}");
        wait_pod_gone(sid, SETTLE).map_err(|left| anyhow::anyhow!("{left}\n{}", self.c.diagnostics()))
    }

    fn pass(&self) -> CaseResult {
        self.passed.set(true);
        Ok(Outcome::Passed)
    }
}

impl Drop for Env {
    /// A case that failed halfway leaves pods: they go while containerd still runs.
    fn drop(&mut self) {
        if !self.passed.get() {
            eprintln!("{}", self.c.diagnostics());
        }
        for id in self.crictl(&["pods", "-q"], None).map(|o| o.stdout).unwrap_or_default().lines() {
            eprintln!("crictl: cleaning up pod {id}");
            let _ = self.crictl(&["stopp", id], None);
            let _ = self.crictl(&["rmp", id], None);
        }
    }
}

// ---- cases ----

/// The README's walk-through, step by step, with what each step must show.
fn walkthrough() -> CaseResult {
    skip_unless_ready!();
    let e = env(false)?;
    let pod = e.pod("walk", false)?;
    let sid = e.runp(&pod)?;

    let p = e.json(&["inspectp", &sid])?;
    ensure_that!(p["status"]["state"] == "SANDBOX_READY", "inspectp state: {}", p["status"]["state"]);
    ensure_that!(p["status"]["runtimeHandler"] == "wisp", "inspectp status.runtimeHandler: {}", p["status"]);
    ensure_that!(
        p["info"]["runtimeType"] == "io.containerd.wisp.v2",
        "inspectp runtimeType: {}",
        p["info"]["runtimeType"]
    );
    ensure_that!(vmm_pids(&sid).len() == 1, "pod {sid} has wisp-vmm processes {:?}", vmm_pids(&sid));

    let c = e.container("web", &["sh", "-c", "echo hello-from-wisp; echo to-stderr >&2; exec sleep 600"], json!({}))?;
    let cid = e.create_start(&sid, &c, &pod)?;
    e.wait_state(&cid, "CONTAINER_RUNNING")?;
    let ps = e.ok(&["ps", "--pod", &sid])?;
    ensure_that!(ps.contains(&cid[..13]) && ps.contains("Running"), "crictl ps: {ps}");
    let i = e.json(&["inspect", &cid])?;
    ensure_that!(
        i["info"]["runtimeType"] == "io.containerd.wisp.v2",
        "inspect runtimeType: {}",
        i["info"]["runtimeType"]
    );
    ensure_that!(i["info"]["sandboxID"] == sid.as_str(), "inspect sandboxID: {}", i["info"]["sandboxID"]);

    // exec: the guest's kernel, exit codes passed through.
    let kernel = e.ok(&["exec", &cid, "uname", "-r"])?;
    let host = host_kernel()?;
    ensure_that!(!kernel.is_empty() && kernel != host, "crictl exec uname -r: {kernel:?} (host {host:?})");
    // crictl exits 1 and names the command's exit code (as it does for runc).
    let three = e.crictl(&["exec", &cid, "sh", "-c", "echo out; exit 3"], None)?;
    ensure_that!(
        three.code != 0 && three.stdout.contains("out") && three.stderr.contains("exit code 3"),
        "exec exit 3: {} {:?} {:?}",
        three.code,
        three.stdout,
        three.stderr
    );
    let sync = e.crictl(&["exec", "--sync", "--timeout", "60", &cid, "sh", "-c", "exit 4"], None)?;
    ensure_that!(
        sync.code != 0 && sync.stderr.contains("exited with 4"),
        "exec --sync exit 4: {} {:?}",
        sync.code,
        sync.stderr
    );

    // logs: both streams, and --tail.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let logs = e.crictl(&["logs", &cid], None)?;
        if logs.stdout.contains("hello-from-wisp") && logs.stderr.contains("to-stderr") {
            break;
        }
        ensure_that!(Instant::now() < deadline, "crictl logs: {:?} / {:?}", logs.stdout, logs.stderr);
        std::thread::sleep(Duration::from_millis(300));
    }

    // stats: the container's memory and CPU, measured in the guest.
    let s = e.json(&["stats", "-o", "json", &cid])?;
    let st = &s["stats"][0];
    let ws = st["memory"]["workingSetBytes"]["value"].as_str().and_then(|v| v.parse::<u64>().ok());
    ensure_that!(ws.is_some_and(|b| b > 0), "stats memory workingSetBytes: {}", st["memory"]);
    ensure_that!(st["attributes"]["id"] == cid.as_str(), "stats for another container: {}", st["attributes"]);
    let pstats = e.json(&["statsp", "-o", "json", &sid])?;
    ensure_that!(pstats["stats"].as_array().is_some_and(|a| !a.is_empty()), "statsp: {pstats}");

    // stop: the container exits with SIGTERM's status (sleep dies of it).
    e.ok(&["stop", "--timeout", "10", &cid])?;
    e.wait_state(&cid, "CONTAINER_EXITED")?;
    let code = e.json(&["inspect", &cid])?["status"]["exitCode"].as_i64();
    ensure_that!(code == Some(143) || code == Some(137), "exit code after stop: {code:?}");
    e.ok(&["rm", &cid])?;
    e.remove_pod(&sid)?;
    ensure_that!(all_vmm_pids().is_empty(), "wisp-vmm left: {:?}", all_vmm_pids());
    e.pass()
}

/// `crictl attach -i` reaches a running container's stdin and streams its output, and
/// `crictl exec -i` an exec's; `crictl exec -it` gets a terminal.
fn attach_and_interactive_exec() -> CaseResult {
    skip_unless_ready!();
    let e = env(false)?;
    let pod = e.pod("attach", false)?;
    let sid = e.runp(&pod)?;
    // stdin_once: the container's stdin closes when the first attach ends.
    let c = e.container(
        "reader",
        &["sh", "-c", "while read l; do echo got:$l; done; echo stdin-closed"],
        json!({"stdin": true, "stdin_once": true}),
    )?;
    let cid = e.create_start(&sid, &c, &pod)?;
    e.wait_state(&cid, "CONTAINER_RUNNING")?;
    let out = e.ok_with(&["attach", "-i", &cid], Some(b"hello\nworld\n"))?;
    ensure_that!(out.contains("got:hello") && out.contains("got:world"), "attach output: {out:?}");
    e.wait_state(&cid, "CONTAINER_EXITED")?;
    let logs = e.ok(&["logs", &cid])?;
    ensure_that!(logs.contains("stdin-closed"), "the container did not see its stdin close: {logs:?}");

    let c2 = e.container("sleeper", &["sleep", "600"], json!({}))?;
    let cid2 = e.create_start(&sid, &c2, &pod)?;
    e.wait_state(&cid2, "CONTAINER_RUNNING")?;
    let echoed = e.ok_with(&["exec", "-i", &cid2, "sh", "-c", "tr a-z A-Z"], Some(b"interactive\n"))?;
    ensure_that!(echoed == "INTERACTIVE", "exec -i: {echoed:?}");
    // -it wants a terminal on crictl's side too: script(1) gives it one.
    let line = format!(
        "{} --config {} exec -it {cid2} sh -c 'test -t 0 && test -t 1 && echo tty-ok'",
        e.crictl.display(),
        e.config.display()
    );
    eprintln!("+ script -qec \"{line}\" /dev/null");
    let mut script = std::process::Command::new("script");
    script.args(["-qec", &line, "/dev/null"]);
    let tty = output_within(&mut script, Some(b""), TIMEOUT)?;
    let text = String::from_utf8_lossy(&tty.stdout);
    ensure_that!(
        text.contains("tty-ok"),
        "exec -it has no terminal: {text:?} {:?}",
        String::from_utf8_lossy(&tty.stderr)
    );
    e.remove_pod(&sid)?;
    e.pass()
}

/// A pod on a CNI network under containerd 2: its default pod sysctls
/// (`net.ipv4.ip_unprivileged_port_start=0`, `net.ipv4.ping_group_range=0 2147483647`)
/// hold in the guest, where the pod's network is; the pod answers on its address from
/// the host.
fn pod_network_and_default_sysctls() -> CaseResult {
    skip_unless_ready!(need_cni());
    let e = env(true)?;
    let pod = e.pod("net", true)?;
    let sid = e.runp(&pod)?;
    let c = e.container("srv", &["sh", "-c", "echo served > /index.html; exec httpd -f -p 8080 -h /"], json!({}))?;
    let cid = e.create_start(&sid, &c, &pod)?;
    e.wait_state(&cid, "CONTAINER_RUNNING")?;
    let ports = e.ok(&["exec", &cid, "cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start"])?;
    let ping = e.ok(&["exec", &cid, "cat", "/proc/sys/net/ipv4/ping_group_range"])?;
    if e.c.build.major >= 2 {
        ensure_that!(ports == "0", "ip_unprivileged_port_start in the guest: {ports:?} (containerd 2 sets 0)");
        let range: Vec<&str> = ping.split_whitespace().collect();
        ensure_that!(range == ["0", "2147483647"], "ping_group_range in the guest: {ping:?}");
    } else {
        eprintln!("crictl: containerd 1.x sets no default pod sysctls (guest: {ports}, {ping:?})");
    }
    let ip = e.json(&["inspectp", &sid])?["status"]["network"]["ip"].as_str().unwrap_or_default().to_string();
    ensure_that!(ip.starts_with("10.88.0."), "pod address: {ip:?}");
    // The server may still be starting: ask until it answers.
    let url = format!("http://{ip}:8080/index.html");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = http_get(&ip, 8080, "/index.html");
        if got.as_ref().is_ok_and(|b| b.trim() == "served") {
            break;
        }
        if Instant::now() > deadline {
            let inside = e.crictl(&["exec", &cid, "sh", "-c", "netstat -ltn; ps; ip addr"], None)?;
            bail!("{url} from the host: {got:?}; in the container: {:?} {:?}", inside.stdout, inside.stderr);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    e.remove_pod(&sid)?;
    wisp_tests::cni::delete_bridge();
    e.pass()
}

fn main() {
    Suite::new("crictl")
        .case("walkthrough", walkthrough)
        .case("attach_and_interactive_exec", attach_and_interactive_exec)
        .case("pod_network_and_default_sysctls", pod_network_and_default_sysctls)
        .run()
}
