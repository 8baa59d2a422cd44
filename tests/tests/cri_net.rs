//! Pod networking end to end: containerd's CRI plugin with a real CNI network (Debian's
//! containernetworking-plugins: `bridge` + `host-local` + `loopback`), pods with runtime
//! handler `wisp` in micro-VMs (in the emulated KVM host) and, as peers, pods with
//! `runc`. The CNI interface of the pod's network namespace must become the guest's
//! `eth0` (same MAC, IP, MTU, default route), pods must reach each other over the bridge,
//! and stopping pods must leave nothing behind: no taps or tc filters, no CNI
//! reservations, no veths, namespaces, mounts, processes or state directories.
//!
//! The emulated host has no outside network: all traffic is between pods of the case,
//! on the bridge `wispbr0` (gateway 10.88.0.1, the host's address on the bridge).

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use wisp_tests::cni::{conflist, delete_bridge, need_cni, BRIDGE, CNI_MTU, GATEWAY, HOST_LOCAL_DIR, NET_NAME, SUBNET};
use wisp_tests::containerd::{need_containerd, wisp_config, Containerd};
use wisp_tests::cri::{v1 as api, CallError, ContainerConfig, Cri, ExecResult, PodConfig};
use wisp_tests::harness::{need_full_kvm, need_root, CaseResult, Outcome, Suite};
use wisp_tests::image::PAUSE_IMAGE;
use wisp_tests::process::output_within;
use wisp_tests::procs::{
    all_shim_pids, all_vmm_pids, host_kernel, mounts_under, processes, vmm_pids, wait_pod_gone, STATE_DIR,
};
use wisp_tests::rootfs::{need_busybox, HOST_BUSYBOX};
use wisp_tests::{ensure_that, need_built, skip_unless};

const WISP: &str = "wisp";
const RUNC: &str = "runc";
/// wisp's state directory (the default; the test config does not change it).
/// Guest consoles go to /run/wisp/<sid>/vmm/console.log; the shim logs their tail when a VM ends.
const DEBUG: &str = "[runtime]\ndebug = true\n";
/// How long teardown may take to finish after the CRI call returned, under TCG.
const SETTLE: Duration = Duration::from_secs(120);

/// Where containerd bind-mounts the pods' network namespaces (`cni-<uuid>`).
const NETNS_DIR: &str = "/var/run/netns";

/// The big transfers (pod A -> pod B, and the wisp vs runc comparison).
const BIG_MIB: u32 = 64;
/// The small transfers between a wisp and a runc pod.
const SMALL_MIB: u32 = 1;
const PORT: u16 = 5000;
/// ExecSync timeout of the commands that write, send or receive a payload.
const TRANSFER_SECS: i64 = 900;
/// Pod create/delete cycles of the leak case.
const CYCLES: usize = 20;
/// How many more open fds containerd may have after the cycles than after the first.
const FD_SLACK: usize = 4;

fn need_artifacts() -> Option<String> {
    need_built(&["release/containerd-shim-wisp-v2", "release/wisp-vmm", "guest/vmlinux", "guest/initrd.img"])
}

macro_rules! skip_unless_net_ready {
    () => {
        skip_unless!(need_root(), need_containerd(), need_busybox(), need_artifacts(), need_cni(), need_full_kvm())
    };
}

// ---- host-side helpers ----

/// Runs a host command (at most 60 s); it must succeed. Returns its stdout.
fn host(args: &[&str]) -> anyhow::Result<String> {
    let out = output_within(Command::new(args[0]).args(&args[1..]), None, Duration::from_secs(60))
        .with_context(|| format!("running {args:?}"))?;
    if !out.status.success() {
        bail!("{args:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `args` run in the network namespace `netns` (a path: a bind mount or /proc/<pid>/fd/<n>),
/// or in the host's when None.
fn net_cmd(netns: Option<&str>, args: &[&str]) -> anyhow::Result<String> {
    match netns {
        None => host(args),
        Some(ns) => {
            let flag = format!("--net={ns}");
            let mut full = vec!["nsenter", flag.as_str()];
            full.extend_from_slice(args);
            host(&full)
        }
    }
}

/// `ip -j <args>` parsed.
fn ip_json(netns: Option<&str>, args: &[&str]) -> anyhow::Result<Value> {
    let mut full = vec!["ip", "-j"];
    full.extend_from_slice(args);
    let text = net_cmd(netns, &full)?;
    serde_json::from_str(if text.trim().is_empty() { "[]" } else { &text })
        .with_context(|| format!("parsing `ip -j {}`: {text:?}", args.join(" ")))
}

/// The names of the network interfaces in a namespace (the host's when None).
fn link_names(netns: Option<&str>) -> anyhow::Result<BTreeSet<String>> {
    let links = ip_json(netns, &["link", "show"])?;
    Ok(links.as_array().into_iter().flatten().filter_map(|l| l["ifname"].as_str().map(String::from)).collect())
}

fn is_wisp_tap(name: &str) -> bool {
    name.starts_with("tap") && name.ends_with("_wisp")
}

/// The host interfaces enslaved to the CNI bridge (the pods' host-side veths).
fn bridge_ports() -> anyhow::Result<BTreeSet<String>> {
    if !Path::new("/sys/class/net").join(BRIDGE).exists() {
        return Ok(BTreeSet::new());
    }
    let links = ip_json(None, &["link", "show", "master", BRIDGE])?;
    Ok(links.as_array().into_iter().flatten().filter_map(|l| l["ifname"].as_str().map(String::from)).collect())
}

/// The addresses host-local has reserved in our network (one file per address).
fn reservations() -> BTreeSet<String> {
    std::fs::read_dir(Path::new(HOST_LOCAL_DIR).join(NET_NAME))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
        .collect()
}

fn netns_files() -> BTreeSet<String> {
    std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

fn state_dirs() -> Vec<PathBuf> {
    wisp_tests::procs::sandbox_dirs()
}

/// The network namespace path in the sandbox container's spec (containerd's verbose
/// PodSandboxStatus info carries it as `runtimeSpec`).
fn netns_of(info: &Value) -> Option<String> {
    info.pointer("/runtimeSpec/linux/namespaces")?.as_array()?.iter().find(|n| n["type"] == "network")?["path"]
        .as_str()
        .filter(|p| !p.is_empty())
        .map(String::from)
}

// ---- what a pod's network looks like ----

/// The pod's network as the host sees it: CRI's pod IP, and the CNI interface `eth0` in
/// the pod's network namespace.
#[derive(Debug)]
struct PodNet {
    ip: String,
    netns: String,
    mac: String,
    mtu: u64,
    prefix: u64,
    gateway: String,
}

/// The guest's (or a runc container's) `eth0` as busybox `ip` shows it.
#[derive(Debug, Default)]
struct InnerNet {
    mac: String,
    mtu: u64,
    /// `a.b.c.d/nn`
    inet: Vec<String>,
    default_via: Option<String>,
    default_dev: Option<String>,
}

/// Parses busybox `ip addr show dev eth0` and `ip route`.
fn parse_inner_net(addr: &str, route: &str) -> InnerNet {
    let mut n = InnerNet::default();
    for line in addr.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        for w in t.windows(2) {
            match w[0] {
                "mtu" => n.mtu = w[1].parse().unwrap_or(0),
                "link/ether" => n.mac = w[1].to_ascii_lowercase(),
                "inet" => n.inet.push(w[1].to_string()),
                _ => {}
            }
        }
    }
    for line in route.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.first() != Some(&"default") {
            continue;
        }
        for w in t.windows(2) {
            match w[0] {
                "via" => n.default_via = Some(w[1].to_string()),
                "dev" => n.default_dev = Some(w[1].to_string()),
                _ => {}
            }
        }
    }
    n
}

/// `N packets received` of busybox ping's summary.
fn ping_received(out: &str) -> Option<u32> {
    let t: Vec<&str> = out.split_whitespace().collect();
    t.windows(3).find(|w| w[1] == "packets" && w[2].starts_with("received")).and_then(|w| w[0].parse().ok())
}

/// One payload sent from pod A to pod B.
struct Transfer {
    mib: u32,
    /// Host wall time of the sender's ExecSync (connect, send, the receiver's close).
    wall: Duration,
    /// The same, on the sending pod's clock around `nc` alone (/proc/uptime).
    in_pod: Option<f64>,
}

impl Transfer {
    fn wall_rate(&self) -> f64 {
        f64::from(self.mib) / self.wall.as_secs_f64()
    }

    fn pod_rate(&self) -> Option<f64> {
        self.in_pod.filter(|s| *s > 0.0).map(|s| f64::from(self.mib) / s)
    }

    fn describe(&self) -> String {
        format!(
            "{} MiB in {:.2}s: {:.1} MiB/s (sender's own clock: {})",
            self.mib,
            self.wall.as_secs_f64(),
            self.wall_rate(),
            self.pod_rate().map_or("n/a".into(), |r| format!("{r:.1} MiB/s"))
        )
    }
}

// ---- the test environment ----

struct Env {
    c: Containerd,
    cri: Cri,
    image: String,
    /// Pod log directories.
    scratch: tempfile::TempDir,
    /// Set by `pass`: otherwise dropping the Env prints what is needed to debug.
    passed: std::cell::Cell<bool>,
}

fn env() -> anyhow::Result<Env> {
    // The network and its bridge are this suite's own: what an earlier run left (a case
    // killed halfway) would confuse the checks.
    wisp_tests::cni::reset();
    let conf = conflist();
    let c = Containerd::start_with_cni(&wisp_config(DEBUG), &[("10-wisp-cri-net.conflist", &conf)])?;
    let image = c.import_cri_images()?;
    let cri = Cri::connect(&c.socket)?;
    let v = cri.version()?;
    eprintln!("cri: {} {} (CRI {})", v.runtime_name, v.runtime_version, v.runtime_api_version);
    // The CRI plugin learns about imported images from containerd's events, and about
    // the network config when it has loaded the conf dir.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let images = cri.image_present(&image)? && cri.image_present(PAUSE_IMAGE)?;
        let conditions = cri.conditions()?;
        let net = conditions.get("NetworkReady").is_some_and(|(ok, _)| *ok);
        if images && net {
            break;
        }
        ensure_that!(
            Instant::now() < deadline,
            "after 60 s: images {image} and {PAUSE_IMAGE} listed: {images}; conditions {conditions:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let scratch = tempfile::Builder::new().prefix("wisp-cri-net-").tempdir()?;
    Ok(Env { c, cri, image, scratch, passed: Default::default() })
}

impl Env {
    fn pass(&self) -> CaseResult {
        self.passed.set(true);
        Ok(Outcome::Passed)
    }

    /// A CRI error with containerd's log (shim logs included) and the guest consoles.
    fn diag(&self, e: CallError) -> anyhow::Error {
        anyhow!("{e}\n{}", self.c.diagnostics())
    }

    /// A pod config with a pod network namespace (CNI) and its own log directory.
    fn pod(&self, name: &str) -> anyhow::Result<api::PodSandboxConfig> {
        let logs = self.scratch.path().join("logs").join(name);
        std::fs::create_dir_all(&logs)?;
        Ok(PodConfig::new(name, &logs).build())
    }

    /// A container that only keeps the pod busy.
    fn sleeper(&self, name: &str) -> api::ContainerConfig {
        ContainerConfig::new(name, &self.image, &["sleep", "3600"]).build()
    }

    /// RunPodSandbox, then checks the pod is READY.
    fn run_pod(&self, pod: &api::PodSandboxConfig, handler: &str) -> anyhow::Result<String> {
        let t = Instant::now();
        let id = self.cri.run_pod(pod, handler).map_err(|e| self.diag(e))?;
        eprintln!("cri: pod {id} ({handler}) ready after {:.1}s", t.elapsed().as_secs_f64());
        let (status, _) = self.cri.pod_status(&id).map_err(|e| self.diag(e))?;
        ensure_that!(status.state == api::PodSandboxState::SandboxReady as i32, "pod {id} is not READY: {status:?}");
        Ok(id)
    }

    /// CreateContainer + StartContainer.
    fn start(
        &self,
        pod_id: &str,
        pod: &api::PodSandboxConfig,
        config: &api::ContainerConfig,
    ) -> anyhow::Result<String> {
        let id = self.cri.create_container(pod_id, config, pod).map_err(|e| self.diag(e))?;
        self.cri.start_container(&id).map_err(|e| self.diag(e))?;
        Ok(id)
    }

    /// A pod with one sleeping container: (sandbox id, container id).
    fn pod_with_sleeper(&self, name: &str, handler: &str) -> anyhow::Result<(String, String)> {
        let pod = self.pod(name)?;
        let sid = self.run_pod(&pod, handler)?;
        let cid = self.start(&sid, &pod, &self.sleeper("main"))?;
        Ok((sid, cid))
    }

    fn exec_result(&self, id: &str, cmd: &[&str], timeout_secs: i64) -> anyhow::Result<ExecResult> {
        self.cri.exec_sync(id, cmd, timeout_secs).map_err(|e| self.diag(e))
    }

    /// ExecSync that must exit 0; returns its stdout.
    fn exec(&self, id: &str, cmd: &[&str]) -> anyhow::Result<String> {
        self.cri.exec_ok(id, cmd).map_err(|e| anyhow!("{e:#}\n{}", self.c.diagnostics()))
    }

    /// `sh -c script` that must exit 0 within TRANSFER_SECS; returns its stdout.
    fn sh(&self, id: &str, script: &str) -> anyhow::Result<String> {
        let r = self.exec_result(id, &["sh", "-c", script], TRANSFER_SECS)?;
        if r.exit_code != 0 {
            bail!(
                "in {id}: `{script}` exited {}; stdout {:?}, stderr {:?}\n{}",
                r.exit_code,
                r.stdout,
                r.stderr,
                self.c.diagnostics()
            );
        }
        Ok(r.stdout)
    }

    fn remove_pod(&self, id: &str) -> anyhow::Result<()> {
        let t = Instant::now();
        self.cri.stop_pod(id).map_err(|e| self.diag(e))?;
        self.cri.remove_pod(id).map_err(|e| self.diag(e))?;
        eprintln!("cri: pod {id} stopped and removed in {:.1}s", t.elapsed().as_secs_f64());
        Ok(())
    }

    /// The pod's VM is running: its state directory and one wisp-vmm of its own.
    fn assert_vm(&self, sid: &str) -> anyhow::Result<()> {
        let dir = Path::new(STATE_DIR).join(sid);
        ensure_that!(dir.is_dir(), "{} does not exist", dir.display());
        let vmms = vmm_pids(sid);
        ensure_that!(vmms.len() == 1, "pod {sid} has wisp-vmm processes {vmms:?}, want exactly one");
        Ok(())
    }

    /// Nothing of the pod's VM is left: no wisp-vmm, no state dir, no mounts under it,
    /// no shim (waits up to SETTLE: teardown continues after the CRI call returns).
    fn assert_vm_gone(&self, sid: &str) -> anyhow::Result<()> {
        wait_pod_gone(sid, SETTLE).map_err(|left| anyhow!("{left}\n{}", self.c.diagnostics()))
    }

    /// The pod's IP (PodSandboxStatus) and its CNI interface in the pod's namespace.
    fn pod_net(&self, sid: &str) -> anyhow::Result<PodNet> {
        let (status, info) = self.cri.pod_status(sid).map_err(|e| self.diag(e))?;
        let ip = status.network.as_ref().map(|n| n.ip.clone()).unwrap_or_default();
        ensure_that!(!ip.is_empty(), "pod {sid}: no IP in PodSandboxStatus: {status:?}");
        let info: Value = serde_json::from_str(info.get("info").map(String::as_str).unwrap_or("{}"))?;
        let netns = netns_of(&info)
            .ok_or_else(|| anyhow!("pod {sid}: no network namespace path in the sandbox spec: {info}"))?;
        let links = ip_json(Some(&netns), &["addr", "show", "dev", "eth0"])?;
        let eth0 = &links[0];
        let mac = eth0["address"].as_str().unwrap_or_default().to_ascii_lowercase();
        let mtu = eth0["mtu"].as_u64().unwrap_or(0);
        let prefix = eth0["addr_info"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["family"] == "inet" && a["local"] == ip.as_str())
            .and_then(|a| a["prefixlen"].as_u64())
            .ok_or_else(|| anyhow!("pod {sid}: eth0 in {netns} does not have the pod IP {ip}: {eth0}"))?;
        let routes = ip_json(Some(&netns), &["route", "show", "default"])?;
        let gateway = routes[0]["gateway"].as_str().unwrap_or_default().to_string();
        ensure_that!(!mac.is_empty() && mtu > 0 && !gateway.is_empty(), "pod {sid}: eth0 {eth0}, routes {routes}");
        // containerd's record of the CNI result names the same interface.
        if let Some(cni_mac) = info.pointer("/cniResult/Interfaces/eth0/Mac").and_then(Value::as_str) {
            ensure_that!(cni_mac.eq_ignore_ascii_case(&mac), "pod {sid}: CNI result MAC {cni_mac}, eth0 has {mac}");
        }
        Ok(PodNet { ip, netns, mac, mtu, prefix, gateway })
    }

    /// `eth0` and the default route as seen from inside a container.
    fn inner_net(&self, cid: &str) -> anyhow::Result<InnerNet> {
        let addr = self.exec(cid, &["ip", "addr", "show", "dev", "eth0"])?;
        let route = self.exec(cid, &["ip", "route"])?;
        eprintln!("cri: in {cid}:\n{addr}{route}");
        Ok(parse_inner_net(&addr, &route))
    }

    /// `ping -c 3` from a container to `ip`: every echo must be answered.
    fn ping(&self, from: &str, ip: &str) -> anyhow::Result<()> {
        eprintln!("cri: ping -c 3 {ip} from {from}");
        let r = self.exec_result(from, &["ping", "-c", "3", "-W", "10", ip], 120)?;
        let received = ping_received(&r.stdout);
        ensure_that!(
            r.exit_code == 0 && received == Some(3),
            "ping from {from} to {ip}: exit {}, received {received:?}\nstdout: {}stderr: {}",
            r.exit_code,
            r.stdout,
            r.stderr
        );
        eprintln!("cri: {from} -> {ip}: 3 of 3 echoes answered");
        Ok(())
    }

    /// Sends `mib` MiB of random bytes over TCP with busybox `nc` from container `from`
    /// to container `to` (whose pod has `to_ip`); the sha256 of what was written on A and
    /// of what arrived on B must match. B hashes the stream as it arrives (no disk).
    fn transfer(&self, from: &str, to: &str, to_ip: &str, mib: u32) -> anyhow::Result<Transfer> {
        eprintln!("cri: {mib} MiB from {from} to {to} ({to_ip}:{PORT}): writing the payload");
        let made = self.sh(
            from,
            &format!("dd if=/dev/urandom of=/tmp/payload bs=1048576 count={mib} 2>/dev/null && sha256sum /tmp/payload"),
        )?;
        let sent_hash = made.split_whitespace().next().unwrap_or_default().to_string();
        ensure_that!(sent_hash.len() == 64, "sha256sum of the payload: {made:?}");

        // The listener's stdin is a FIFO nobody writes to: busybox nc half-closes the
        // connection when its stdin ends, which would make the sender stop early.
        let recv_script =
            format!("rm -f /tmp/nc-in && mkfifo /tmp/nc-in && exec 3<>/tmp/nc-in && nc -l -p {PORT} <&3 | sha256sum");
        let (tx, rx) = mpsc::channel();
        let (socket, to_id) = (self.c.socket.clone(), to.to_string());
        // A CRI connection of its own: this ExecSync blocks until the transfer ends. If
        // the case fails first, the thread ends with the pod (the Env removes it).
        std::thread::spawn(move || {
            let r = Cri::connect(&socket).map_err(|e| format!("{e:#}")).and_then(|c| {
                c.exec_sync(&to_id, &["sh", "-c", &recv_script], TRANSFER_SECS).map_err(|e| e.to_string())
            });
            let _ = tx.send(r);
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = rx.try_recv() {
                bail!("the receiver in {to} ended before anything was sent: {r:?}\n{}", self.c.diagnostics());
            }
            let listening = self.exec(to, &["netstat", "-ltn"])?;
            if listening.lines().any(|l| l.contains(&format!(":{PORT} ")) && l.contains("LISTEN")) {
                break;
            }
            ensure_that!(Instant::now() < deadline, "nothing listens on port {PORT} in {to} after 60 s:\n{listening}");
            std::thread::sleep(Duration::from_millis(200));
        }

        eprintln!("cri: {to} listens; sending");
        let send_script = format!(
            "s=$(cut -d' ' -f1 /proc/uptime); nc {to_ip} {PORT} </tmp/payload || exit 1; \
             e=$(cut -d' ' -f1 /proc/uptime); echo \"$s $e\""
        );
        let t = Instant::now();
        let sent = self.sh(from, &send_script);
        let wall = t.elapsed();
        let sent = sent.with_context(|| format!("sending {mib} MiB from {from} to {to_ip}:{PORT}"))?;
        let received = match rx.recv_timeout(SETTLE) {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => bail!("the receiver in {to}: {e}\n{}", self.c.diagnostics()),
            Err(_) => bail!("the receiver in {to} did not end {SETTLE:?} after the sender\n{}", self.c.diagnostics()),
        };
        let recv_hash = received.stdout.split_whitespace().next().unwrap_or_default();
        ensure_that!(
            received.exit_code == 0 && recv_hash == sent_hash,
            "{mib} MiB from {from} to {to}: sent sha256 {sent_hash}, received: exit {}, stdout {:?}, stderr {:?}",
            received.exit_code,
            received.stdout,
            received.stderr
        );
        let times: Vec<f64> = sent.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        let in_pod = (times.len() == 2).then(|| times[1] - times[0]);
        self.exec(from, &["rm", "-f", "/tmp/payload"])?;
        let t = Transfer { mib, wall, in_pod };
        eprintln!("cri: {from} -> {to}: sha256 {sent_hash} on both sides; {}", t.describe());
        Ok(t)
    }

    /// The pid of this case's containerd.
    fn containerd_pid(&self) -> anyhow::Result<u32> {
        let config = self.c.dir.path().join("config.toml").display().to_string();
        let pids = processes("containerd", |args| args.contains(&config));
        ensure_that!(pids.len() == 1, "containerd processes with --config {config}: {pids:?}");
        Ok(pids[0])
    }

    fn containerd_fds(&self) -> anyhow::Result<usize> {
        let pid = self.containerd_pid()?;
        Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
    }

    /// Waits (up to SETTLE) until no wisp process or state is left at all.
    fn settle_all(&self, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let (dirs, vmms, shims) = (state_dirs(), all_vmm_pids(), all_shim_pids());
            if dirs.is_empty() && vmms.is_empty() && shims.is_empty() {
                return Ok(());
            }
            ensure_that!(
                Instant::now() < deadline,
                "{what}: left after {SETTLE:?}: state dirs {dirs:?}, wisp-vmm {vmms:?}, shims {shims:?}\n{}",
                self.c.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Env {
    /// A case that failed halfway leaves pods: stop and remove them while containerd
    /// runs, then the bridge goes (containerd is stopped when its field drops).
    fn drop(&mut self) {
        if !self.passed.get() {
            let log = self.c.log();
            let lines: Vec<&str> = log.lines().filter(|l| !l.contains("level=debug") && !l.trim().is_empty()).collect();
            eprintln!(
                "--- containerd log without debug lines (last 250) ---\n{}",
                lines[lines.len().saturating_sub(250)..].join("\n")
            );
            eprintln!("{}", self.c.diagnostics());
        }
        for p in self.cri.list_pods().unwrap_or_default() {
            eprintln!("cri: cleaning up pod {}", p.id);
            let _ = self.cri.stop_pod(&p.id);
            let _ = self.cri.remove_pod(&p.id);
        }
        delete_bridge();
    }
}

/// What of the host's network a pod could leave behind.
#[derive(Debug, PartialEq, Eq)]
struct HostNet {
    /// Interfaces of the host's namespace but the CNI bridge (made by the first pod, kept).
    links: BTreeSet<String>,
    netns: BTreeSet<String>,
    /// Mounts of network namespaces.
    netns_mounts: Vec<String>,
}

impl HostNet {
    fn take() -> anyhow::Result<Self> {
        let mut links = link_names(None)?;
        links.remove(BRIDGE);
        let mut netns_mounts = mounts_under(&[Path::new("/run/netns"), Path::new(NETNS_DIR)]);
        netns_mounts.sort();
        Ok(Self { links, netns: netns_files(), netns_mounts })
    }
}

// ---- cases ----

/// The CNI interface becomes the guest's eth0: CRI's pod IP, the veth's MAC and MTU, the
/// namespace's default route, in a guest with its own kernel.
fn pod_gets_its_cni_address() -> CaseResult {
    skip_unless_net_ready!();
    let e = env()?;
    let (sid, cid) = e.pod_with_sleeper("addr", WISP)?;
    e.assert_vm(&sid)?;
    let net = e.pod_net(&sid)?;
    eprintln!("cri: pod {sid}: {net:?}");
    ensure_that!(
        net.ip.starts_with("10.88.0.") && net.prefix == 24 && net.gateway == GATEWAY,
        "pod {sid}: not an address of {SUBNET} via {GATEWAY}: {net:?}"
    );
    ensure_that!(net.mtu == CNI_MTU, "eth0 in the pod's namespace has MTU {}, want {CNI_MTU}", net.mtu);

    let g = e.inner_net(&cid)?;
    let want_inet = format!("{}/{}", net.ip, net.prefix);
    ensure_that!(g.inet == [want_inet.clone()], "the guest's eth0 has IPv4 {:?}, want [{want_inet}]", g.inet);
    ensure_that!(g.mac == net.mac, "the guest's eth0 has MAC {:?}, the pod namespace's eth0 {:?}", g.mac, net.mac);
    ensure_that!(g.mtu == net.mtu, "the guest's eth0 has MTU {}, the pod namespace's eth0 {}", g.mtu, net.mtu);
    ensure_that!(
        g.default_via.as_deref() == Some(net.gateway.as_str()) && g.default_dev.as_deref() == Some("eth0"),
        "the guest's default route is via {:?} dev {:?}, the namespace's via {}",
        g.default_via,
        g.default_dev,
        net.gateway
    );
    // The guest's eth0 is the VM's NIC, not the veth: a kernel of its own.
    let guest_kernel = e.exec(&cid, &["uname", "-r"])?.trim().to_string();
    let host_kernel = host_kernel()?;
    ensure_that!(
        !guest_kernel.is_empty() && guest_kernel != host_kernel,
        "the container runs the host's kernel {host_kernel:?}"
    );
    // The guest answers on its address from the host (the bridge's gateway address).
    let ping = host(&[HOST_BUSYBOX, "ping", "-c", "1", "-W", "10", &net.ip])?;
    ensure_that!(ping_received(&ping) == Some(1), "the host's ping of {}: {ping}", net.ip);
    eprintln!("cri: guest kernel {guest_kernel:?}, host {host_kernel:?}");

    e.remove_pod(&sid)?;
    e.assert_vm_gone(&sid)?;
    e.pass()
}

/// Two wisp pods on the bridge: ping both ways, then 1 MiB over TCP each way.
fn two_wisp_pods_talk() -> CaseResult {
    skip_unless_net_ready!();
    let e = env()?;
    let (sa, a) = e.pod_with_sleeper("talk-a", WISP)?;
    let (sb, b) = e.pod_with_sleeper("talk-b", WISP)?;
    let (na, nb) = (e.pod_net(&sa)?, e.pod_net(&sb)?);
    ensure_that!(na.ip != nb.ip, "both pods have IP {}", na.ip);
    e.ping(&a, &nb.ip)?;
    e.ping(&b, &na.ip)?;
    e.transfer(&a, &b, &nb.ip, SMALL_MIB)?;
    e.transfer(&b, &a, &na.ip, SMALL_MIB)?;
    e.remove_pod(&sa)?;
    e.remove_pod(&sb)?;
    e.assert_vm_gone(&sa)?;
    e.assert_vm_gone(&sb)?;
    e.pass()
}

/// 64 MiB of random bytes over TCP from one wisp pod to another, intact.
fn two_wisp_pods_move_64mib() -> CaseResult {
    skip_unless_net_ready!();
    let e = env()?;
    let (sa, a) = e.pod_with_sleeper("bulk-a", WISP)?;
    let (sb, b) = e.pod_with_sleeper("bulk-b", WISP)?;
    let nb = e.pod_net(&sb)?;
    let t = e.transfer(&a, &b, &nb.ip, BIG_MIB)?;
    println!("cri_net: wisp -> wisp: {}", t.describe());
    e.remove_pod(&sa)?;
    e.remove_pod(&sb)?;
    e.assert_vm_gone(&sa)?;
    e.assert_vm_gone(&sb)?;
    e.pass()
}

/// A wisp pod and a runc pod on the same bridge: ping and a small TCP transfer each way.
fn wisp_and_runc_pods_talk() -> CaseResult {
    skip_unless_net_ready!();
    let e = env()?;
    let (sw, w) = e.pod_with_sleeper("mixed-wisp", WISP)?;
    let (sr, r) = e.pod_with_sleeper("mixed-runc", RUNC)?;
    let (nw, nr) = (e.pod_net(&sw)?, e.pod_net(&sr)?);
    ensure_that!(nw.ip != nr.ip, "both pods have IP {}", nw.ip);
    // The runc container sees the namespace's eth0 itself: the same picture as the guest.
    let rn = e.inner_net(&r)?;
    ensure_that!(rn.mac == nr.mac && rn.inet == [format!("{}/{}", nr.ip, nr.prefix)], "runc's eth0: {rn:?} vs {nr:?}");
    e.ping(&w, &nr.ip)?;
    e.ping(&r, &nw.ip)?;
    e.transfer(&w, &r, &nr.ip, SMALL_MIB)?;
    e.transfer(&r, &w, &nw.ip, SMALL_MIB)?;
    e.remove_pod(&sw)?;
    e.remove_pod(&sr)?;
    e.assert_vm_gone(&sw)?;
    e.pass()
}

/// StopPodSandbox removes the tap and the tc plumbing, CNI DEL releases the address and
/// the veth; RemovePodSandbox leaves no state dir, VMM or namespace.
fn stop_removes_taps_and_filters() -> CaseResult {
    skip_unless_net_ready!();
    let e = env()?;
    let before = HostNet::take()?;
    let (sid, _cid) = e.pod_with_sleeper("teardown", WISP)?;
    let net = e.pod_net(&sid)?;
    // Held open, the namespace outlives its bind mount (which StopPodSandbox removes):
    // what is left in it stays visible.
    let held = File::open(&net.netns).with_context(|| format!("opening {}", net.netns))?;
    let ns = format!("/proc/{}/fd/{}", std::process::id(), held.as_raw_fd());

    let links = link_names(Some(&ns))?;
    let taps: Vec<&String> = links.iter().filter(|l| is_wisp_tap(l)).collect();
    ensure_that!(taps.len() == 1, "the pod's namespace has links {links:?}: want one tap*_wisp");
    let tap = taps[0].clone();
    let qdiscs = net_cmd(Some(&ns), &["tc", "qdisc", "show"])?;
    for dev in ["eth0", tap.as_str()] {
        ensure_that!(
            qdiscs.lines().any(|l| l.contains("ingress") && l.contains(&format!(" dev {dev} "))),
            "no ingress qdisc on {dev} in the pod's namespace:\n{qdiscs}"
        );
    }
    let filters = net_cmd(Some(&ns), &["tc", "filter", "show", "dev", "eth0", "ingress"])?;
    ensure_that!(filters.contains("mirred") && filters.contains(&tap), "eth0's ingress filters:\n{filters}");
    let filters = net_cmd(Some(&ns), &["tc", "filter", "show", "dev", &tap, "ingress"])?;
    ensure_that!(filters.contains("mirred") && filters.contains("eth0"), "{tap}'s ingress filters:\n{filters}");
    let ports = bridge_ports()?;
    ensure_that!(ports.len() == 1, "{BRIDGE} has ports {ports:?} with one pod");
    let reservation = Path::new(HOST_LOCAL_DIR).join(NET_NAME).join(&net.ip);
    let owner = std::fs::read_to_string(&reservation).with_context(|| format!("reading {}", reservation.display()))?;
    ensure_that!(owner.contains(&sid), "{} holds {owner:?}, not the pod {sid}", reservation.display());
    eprintln!("cri: pod {sid}: {tap} in {}, {BRIDGE} port {ports:?}, reservation {}", net.netns, net.ip);

    let t = Instant::now();
    e.cri.stop_pod(&sid).map_err(|x| e.diag(x))?;
    let deadline = Instant::now() + SETTLE;
    loop {
        let links = link_names(Some(&ns))?;
        let qdiscs = net_cmd(Some(&ns), &["tc", "qdisc", "show"])?;
        let ingress: Vec<&str> = qdiscs.lines().filter(|l| l.contains("ingress")).collect();
        let (ports, reserved) = (bridge_ports()?, reservation.exists());
        let left_links: Vec<&String> = links.iter().filter(|l| is_wisp_tap(l) || *l == "eth0").collect();
        let netns_there = Path::new(&net.netns).exists();
        if left_links.is_empty() && ingress.is_empty() && ports.is_empty() && !reserved && !netns_there {
            break;
        }
        ensure_that!(
            Instant::now() < deadline,
            "{SETTLE:?} after StopPodSandbox: left in the pod's namespace {left_links:?} (want no tap, and \
             no eth0: CNI DEL deletes it), ingress qdiscs {ingress:?}, {BRIDGE} ports {ports:?}, {} exists: {reserved}, \
             {} exists: {netns_there}\n{}",
            reservation.display(),
            net.netns,
            e.c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("cri: pod {sid}: network gone {:.1}s after StopPodSandbox was sent", t.elapsed().as_secs_f64());
    drop(held);
    e.cri.remove_pod(&sid).map_err(|x| e.diag(x))?;
    e.assert_vm_gone(&sid)?;
    let after = HostNet::take()?;
    ensure_that!(after == before, "the host's network before the pod: {before:?}, after: {after:?}");
    e.pass()
}

/// 20 create/delete cycles of a wisp pod with one container leave nothing behind:
/// processes, state dirs, mounts, taps, veths, namespaces, CNI reservations, or
/// containerd fds.
fn twenty_cycles_leak_nothing() -> CaseResult {
    skip_unless_net_ready!();
    let e = env()?;
    let before = HostNet::take()?;
    let mut fds_after_first = 0;
    let mut times = Vec::new();
    for i in 0..CYCLES {
        let t = Instant::now();
        let cycle = || -> anyhow::Result<String> {
            let pod = e.pod(&format!("cycle-{i}"))?;
            let sid = e.cri.run_pod(&pod, WISP).map_err(|x| e.diag(x))?;
            let cid = e.cri.create_container(&sid, &e.sleeper("main"), &pod).map_err(|x| e.diag(x))?;
            e.cri.start_container(&cid).map_err(|x| e.diag(x))?;
            e.cri.stop_pod(&sid).map_err(|x| e.diag(x))?;
            e.cri.remove_pod(&sid).map_err(|x| e.diag(x))?;
            Ok(sid)
        };
        let sid = cycle().with_context(|| format!("cycle {i} of {CYCLES}"))?;
        let took = t.elapsed();
        eprintln!("cri: cycle {i}: pod {sid} created, started, stopped, removed in {:.1}s", took.as_secs_f64());
        times.push(took.as_secs_f64());
        if i == 0 {
            // containerd's own fds settle with its first pod (CNI, shim connections).
            e.settle_all("the first cycle")?;
            fds_after_first = e.containerd_fds()?;
        }
    }
    e.settle_all("20 cycles")?;
    let fds = e.containerd_fds()?;
    let after = HostNet::take()?;
    let (ports, reserved) = (bridge_ports()?, reservations());
    let mounts = mounts_under(&[Path::new(STATE_DIR)]);
    let (min, max) = times.iter().fold((f64::MAX, 0f64), |(lo, hi), t| (lo.min(*t), hi.max(*t)));
    println!(
        "cri_net: {CYCLES} cycles: {:.1}s per cycle on average (min {min:.1}s, max {max:.1}s); containerd fds {fds_after_first} after the first, {fds} after the last",
        times.iter().sum::<f64>() / times.len() as f64
    );
    ensure_that!(e.cri.list_pods()?.is_empty(), "pods still listed: {:?}", e.cri.list_pods()?);
    ensure_that!(after == before, "the host's network before the cycles: {before:?}, after: {after:?}");
    ensure_that!(!after.links.iter().any(|l| is_wisp_tap(l)), "taps on the host: {:?}", after.links);
    ensure_that!(ports.is_empty(), "veths left on {BRIDGE}: {ports:?}");
    ensure_that!(reserved.is_empty(), "host-local still reserves {reserved:?}");
    ensure_that!(mounts.is_empty(), "mounts left under {STATE_DIR}: {mounts:?}");
    ensure_that!(
        fds <= fds_after_first + FD_SLACK,
        "containerd has {fds} fds after {CYCLES} cycles, {fds_after_first} after the first"
    );
    e.pass()
}

/// The harness on runc alone (no VM): two runc pods get addresses of the network, see
/// the namespace's eth0, ping each other and move 1 MiB; their removal releases the
/// addresses and veths. Needs no KVM.
fn runc_pods_talk() -> CaseResult {
    skip_unless!(need_root(), need_containerd(), need_busybox(), need_cni());
    let e = env()?;
    let (sa, a) = e.pod_with_sleeper("runc-a", RUNC)?;
    let (sb, b) = e.pod_with_sleeper("runc-b", RUNC)?;
    let (na, nb) = (e.pod_net(&sa)?, e.pod_net(&sb)?);
    for (n, cid) in [(&na, &a), (&nb, &b)] {
        ensure_that!(
            n.ip.starts_with("10.88.0.") && n.prefix == 24 && n.gateway == GATEWAY && n.mtu == CNI_MTU,
            "not an address of {SUBNET} via {GATEWAY} with MTU {CNI_MTU}: {n:?}"
        );
        let inner = e.inner_net(cid)?;
        ensure_that!(
            inner.mac == n.mac
                && inner.mtu == n.mtu
                && inner.inet == [format!("{}/{}", n.ip, n.prefix)]
                && inner.default_via.as_deref() == Some(GATEWAY),
            "runc container {cid} sees {inner:?}, the namespace has {n:?}"
        );
    }
    ensure_that!(na.ip != nb.ip, "both pods have IP {}", na.ip);
    ensure_that!(reservations() == BTreeSet::from([na.ip.clone(), nb.ip.clone()]), "reserved: {:?}", reservations());
    e.ping(&a, &nb.ip)?;
    e.ping(&b, &na.ip)?;
    e.transfer(&a, &b, &nb.ip, SMALL_MIB)?;
    e.remove_pod(&sa)?;
    e.remove_pod(&sb)?;
    ensure_that!(reservations().is_empty(), "host-local still reserves {:?}", reservations());
    ensure_that!(bridge_ports()?.is_empty(), "veths left on {BRIDGE}: {:?}", bridge_ports()?);
    ensure_that!(all_vmm_pids().is_empty() && all_shim_pids().is_empty(), "runc pods started wisp processes");
    e.pass()
}

fn main() {
    Suite::new("cri_net")
        .case("runc_pods_talk", runc_pods_talk)
        .case("pod_gets_its_cni_address", pod_gets_its_cni_address)
        .case("two_wisp_pods_talk", two_wisp_pods_talk)
        .case("two_wisp_pods_move_64mib", two_wisp_pods_move_64mib)
        .case("wisp_and_runc_pods_talk", wisp_and_runc_pods_talk)
        .case("stop_removes_taps_and_filters", stop_removes_taps_and_filters)
        .case("twenty_cycles_leak_nothing", twenty_cycles_leak_nothing)
        .run()
}
