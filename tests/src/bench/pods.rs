//! Figures measured through containerd: `ctr run` latency and memory per idle pod
//! (wisp vs runc in the same containerd), and pods started at once vs one after
//! another. One private containerd (tests/src/containerd.rs) serves every run of the
//! benchmark; it is started on first use and stopped when the benchmark ends.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::smaps::{vmm_memory, Anchor};
use super::vms::Side;
use super::{Ctx, Part, Sample};
use crate::containerd::{wisp_config, Containerd, CTR_TIMEOUT};
use crate::process::output_within;

pub const WISP_RUNTIME: &str = "io.containerd.wisp.v2";
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// Guest memory of a pod: what `wisp_config` gives the VMM.
pub const POD_MEMORY_MIB: u64 = 256;
/// Pods in the parallel-start figure.
pub const PARALLEL_PODS: usize = 10;
const MIB: f64 = 1024.0;

/// The benchmark's containerd with the busybox image imported, started on first use.
#[derive(Default)]
pub struct PodEnvCell(OnceLock<Result<PodEnv, String>>);

impl std::fmt::Debug for PodEnvCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PodEnvCell")
    }
}

impl PodEnvCell {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn get(&self) -> anyhow::Result<&PodEnv> {
        match self.0.get_or_init(|| PodEnv::start().map_err(|e| format!("{e:#}"))) {
            Ok(env) => Ok(env),
            Err(e) => bail!("starting containerd for the pod benchmarks: {e}"),
        }
    }
}

pub struct PodEnv {
    pub containerd: Containerd,
    pub image: String,
    /// A wisp config like the default one with the VMM's jail and seccomp off, for the
    /// confinement-cost figure (`ctr run --runtime-config-path`).
    pub unconfined_config: std::path::PathBuf,
    /// The default config with `hypervisor.templates` off: every pod boots cold, for the
    /// templates' figures.
    pub cold_config: std::path::PathBuf,
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

fn runtime(side: Side) -> &'static str {
    match side {
        Side::Wisp => WISP_RUNTIME,
        Side::Peer => RUNC_RUNTIME,
    }
}

impl PodEnv {
    fn start() -> anyhow::Result<Self> {
        let containerd =
            Containerd::start_with_cni(&wisp_config(""), &[("10-wisp-bench.conflist", &bench_cni_conflist())])?;
        let image = containerd.import_busybox()?;
        containerd.import_cri_images()?;
        let unconfined_config = containerd.dir.path().join("wisp-unconfined.toml");
        let toml = wisp_config("").replace("memory_mib = 256\n", "memory_mib = 256\njail = false\nseccomp = false\n");
        if !toml.contains("jail = false") {
            bail!("the test wisp config has no [hypervisor] memory_mib line to add jail = false after");
        }
        std::fs::write(&unconfined_config, toml)?;
        let cold_config = containerd.dir.path().join("wisp-cold.toml");
        let toml = wisp_config("").replace("memory_mib = 256\n", "memory_mib = 256\ntemplates = false\n");
        if !toml.contains("templates = false") {
            bail!("the test wisp config has no [hypervisor] memory_mib line to add templates = false after");
        }
        std::fs::write(&cold_config, toml)?;
        Ok(Self { containerd, image, unconfined_config, cold_config })
    }

    /// `ctr args`, failing with ctr's stderr when it fails.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = output_within(&mut self.containerd.ctr(args), None, CTR_TIMEOUT)
            .with_context(|| format!("ctr {}", args.join(" ")))?;
        if !out.status.success() {
            bail!("ctr {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `sleep 600` detached in a new container; returns when its task runs.
    pub fn run_detached(&self, runtime: &str, id: &str) -> anyhow::Result<()> {
        self.ctr(&["run", "-d", "--runtime", runtime, &self.image, id, "sleep", "600"]).map(drop)
    }

    /// `ctr run` arguments for wisp: with the default configuration (templates on) on
    /// the wisp side, with `cold_config` (every pod boots cold) on the peer side.
    fn wisp_run_args<'a>(&'a self, side: Side, cold: &'a str) -> Vec<&'a str> {
        let mut args = vec!["run", "--runtime", WISP_RUNTIME];
        if side == Side::Peer {
            args.extend_from_slice(&["--runtime-config-path", cold]);
        }
        args
    }

    /// The pid of pod `id`'s VMM, from its state directory (`PID STARTTIME`).
    fn vmm_pid(&self, id: &str) -> anyhow::Result<u32> {
        std::fs::read_to_string(Path::new("/run/wisp").join(id).join("vmm.pid"))
            .context("reading the VMM's pid file")?
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .parse()
            .context("the VMM's pid file")
    }

    /// The task's PID as containerd reports it (wisp: the shim; runc: the container).
    pub fn task_pid(&self, id: &str) -> anyhow::Result<u32> {
        let ls = self.ctr(&["task", "ls"])?;
        ls.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                (w.next() == Some(id)).then(|| w.next()?.parse().ok()).flatten()
            })
            .next()
            .with_context(|| format!("task {id} is not in `ctr task ls`:\n{ls}"))
    }

    /// Kills and deletes container `id` and its task; waits until both are gone.
    pub fn remove(&self, id: &str) -> anyhow::Result<()> {
        let _ = self.ctr(&["task", "kill", "-a", "-s", "SIGKILL", id]);
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match self.ctr(&["task", "delete", id]) {
                Ok(_) => break,
                Err(e) if e.to_string().contains("not found") => break,
                Err(e) if Instant::now() > deadline => return Err(e.context(format!("deleting task {id}"))),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        self.ctr(&["container", "delete", id]).map(drop)
    }
}

/// `ctr run --rm <busybox> echo`: wall time of the whole command.
pub fn ctr_run_echo(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    let env = ctx.pods.get()?;
    let id = unique("echo");
    let start = Instant::now();
    let out = env.ctr(&["run", "--rm", "--runtime", runtime(side), &env.image, &id, "echo", "wisp-bench"])?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if out.trim() != "wisp-bench" {
        bail!("ctr run printed {out:?}, not the echoed word");
    }
    Ok(Sample { values: vec![("ctr_run_echo", ms)], ..Default::default() })
}

/// The cost of the VMM's confinement: `ctr run --rm <busybox> echo` through wisp with
/// its defaults (jail, seccomp) against the same with both off, in the same containerd.
pub fn ctr_run_echo_confinement(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    let env = ctx.pods.get()?;
    let id = unique("confined");
    let unconfined = env.unconfined_config.display().to_string();
    let mut args = vec!["run", "--rm", "--runtime", WISP_RUNTIME];
    if side == Side::Peer {
        args.extend_from_slice(&["--runtime-config-path", &unconfined]);
    }
    args.extend_from_slice(&[&env.image, &id, "echo", "wisp-bench"]);
    let start = Instant::now();
    let out = env.ctr(&args)?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if out.trim() != "wisp-bench" {
        bail!("ctr run printed {out:?}, not the echoed word");
    }
    Ok(Sample { values: vec![("ctr_run_echo_confined", ms)], ..Default::default() })
}

/// PSS and RSS of one process, from smaps_rollup (KiB).
pub(super) fn rollup(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().strip_suffix("kB")?.trim().parse().ok())
            .with_context(|| format!("{path} has no {name}"))
    };
    Ok((field("Pss:")?, field("Rss:")?))
}

fn parent_of(pid: u32) -> anyhow::Result<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces: the fields after it follow the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc/<pid>/stat")?;
    rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()).context("no parent pid in /proc/<pid>/stat")
}

/// An idle pod (`sleep 600`): PSS of everything that exists because of it on the
/// host, and its shim's RSS. wisp: shim + VMM (guest RAM the guest touched included);
/// runc: shim + the container's process.
pub fn idle_pod_memory(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    let env = ctx.pods.get()?;
    let id = unique("idle");
    env.run_detached(runtime(side), &id)?;
    let measured = (|| -> anyhow::Result<Sample> {
        std::thread::sleep(ctx.settle);
        let task = env.task_pid(&id)?;
        let kib = |k: u64| k as f64 / MIB;
        let mut parts = Vec::new();
        let (pod_pss, shim_rss) = match side {
            Side::Wisp => {
                // wisp reports the shim as the task's process; the VMM's pid is in the
                // sandbox's state directory.
                let (shim_pss, shim_rss) = rollup(task)?;
                let vmm_pid = env.vmm_pid(&id)?;
                // The guest RAM is found by the kernel command line the VMM wrote into
                // it (console off, as the shim runs it by default).
                let cmdline = wisp_vmm::arch::x86_64::boot::base_cmdline(false)?;
                let bytes = cmdline.as_cstring()?.into_bytes();
                let anchor = Anchor { gpa: wisp_vmm::arch::layout::CMDLINE_START, bytes: &bytes };
                let vmm = vmm_memory(vmm_pid, POD_MEMORY_MIB << 20, Some(anchor))?;
                parts.push(Part { figure: "pod_memory_pss", label: "shim".into(), value: kib(shim_pss) });
                parts.push(Part {
                    figure: "pod_memory_pss",
                    label: "guest RAM touched".into(),
                    value: kib(vmm.guest_pss_kib),
                });
                parts.push(Part {
                    figure: "pod_memory_pss",
                    label: "VMM itself".into(),
                    value: kib(vmm.overhead_kib()),
                });
                (shim_pss + vmm.total_pss_kib, shim_rss)
            }
            Side::Peer => {
                let shim = parent_of(task)?;
                let (shim_pss, shim_rss) = rollup(shim)?;
                let (container_pss, _) = rollup(task)?;
                (shim_pss + container_pss, shim_rss)
            }
        };
        Ok(Sample {
            values: vec![("pod_memory_pss", kib(pod_pss)), ("shim_rss", kib(shim_rss))],
            parts,
            ..Default::default()
        })
    })();
    let removed = env.remove(&id);
    let sample = measured?;
    removed?;
    Ok(sample)
}

/// `ctr run --rm <busybox> echo` through wisp: restored from the shape's template (the
/// default configuration) against booted cold (`hypervisor.templates` off), in the same
/// containerd.
pub fn ctr_run_echo_template(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    let env = ctx.pods.get()?;
    let id = unique("template");
    let cold = env.cold_config.display().to_string();
    let mut args = env.wisp_run_args(side, &cold);
    args.extend_from_slice(&["--rm", &env.image, &id, "echo", "wisp-bench"]);
    let start = Instant::now();
    let out = env.ctr(&args)?;
    let ms = start.elapsed().as_secs_f64() * 1e3;
    if out.trim() != "wisp-bench" {
        bail!("ctr run printed {out:?}, not the echoed word");
    }
    Ok(Sample { values: vec![("ctr_run_echo_template", ms)], ..Default::default() })
}

/// Idle pods running at once in the memory-per-pod figure.
pub const MEMORY_PODS: usize = 10;

/// `MEMORY_PODS` idle wisp pods (`ctr run -d ... sleep 600`) at once, restored from the
/// template (wisp side; a first pod makes sure it exists) or booted cold (peer side):
/// after the settle time, the PSS of their shims and VMMs, per pod. The guest pages a
/// restored pod only read are one page-cache copy of the template's memory file, which
/// PSS splits between the VMMs that map it.
pub fn template_pods_memory(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    let env = ctx.pods.get()?;
    let cold = env.cold_config.display().to_string();
    if side == Side::Wisp {
        let id = unique("warm");
        let mut args = env.wisp_run_args(side, &cold);
        args.extend_from_slice(&["--rm", &env.image, &id, "true"]);
        env.ctr(&args)?;
    }
    let ids: Vec<String> = (0..MEMORY_PODS).map(|_| unique("mem")).collect();
    let measured = (|| -> anyhow::Result<f64> {
        for id in &ids {
            let mut args = env.wisp_run_args(side, &cold);
            args.extend_from_slice(&["-d", &env.image, id, "sleep", "600"]);
            env.ctr(&args)?;
        }
        std::thread::sleep(ctx.settle);
        let mut kib = 0;
        for id in &ids {
            kib += rollup(env.task_pid(id)?)?.0 + rollup(env.vmm_pid(id)?)?.0;
        }
        Ok(kib as f64 / MIB / MEMORY_PODS as f64)
    })();
    let mut removed = Ok(());
    for id in &ids {
        if let Err(e) = env.remove(id) {
            removed = removed.and(Err(e));
        }
    }
    let pss = measured?;
    removed?;
    Ok(Sample { values: vec![("pod_memory_pss_10", pss)], ..Default::default() })
}

/// `PARALLEL_PODS` wisp pods started (`ctr run -d`) all at once (wisp side) or one
/// after another (peer side): time until every task runs.
pub fn parallel_start(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    let env = ctx.pods.get()?;
    let ids: Vec<String> = (0..PARALLEL_PODS).map(|_| unique("par")).collect();
    let start = Instant::now();
    let results: Vec<anyhow::Result<()>> = match side {
        Side::Wisp => std::thread::scope(|s| {
            let handles: Vec<_> = ids.iter().map(|id| s.spawn(move || env.run_detached(WISP_RUNTIME, id))).collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("starter thread panicked"))))
                .collect()
        }),
        Side::Peer => ids.iter().map(|id| env.run_detached(WISP_RUNTIME, id)).collect(),
    };
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let mut first_error = None;
    for (id, r) in ids.iter().zip(results) {
        if let Err(e) = r {
            first_error.get_or_insert(e.context(format!("starting {id}")));
        }
        if let Err(e) = env.remove(id) {
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    Ok(Sample { values: vec![("parallel_start_10", ms)], ..Default::default() })
}

/// One pod through the CRI as the kubelet drives it: RunPodSandbox, CreateContainer,
/// StartContainer, StopPodSandbox, RemovePodSandbox; the wall time of all five calls.
/// Host-network pods (no CNI) on both sides, so the figure is the runtime's alone.
pub fn cri_pod_lifecycle(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    use crate::cri::{ContainerConfig, Cri, PodConfig};
    use k8s_cri::v1 as api;
    let env = ctx.pods.get()?;
    let cri = Cri::connect(&env.containerd.socket)?;
    let logs = tempfile::tempdir()?;
    let name = unique("lifecycle");
    let pod = PodConfig::new(&name, logs.path()).network(api::NamespaceMode::Node).build();
    let container = ContainerConfig::new("main", &env.image, &["sleep", "600"]).build();
    let handler = match side {
        Side::Wisp => "wisp",
        Side::Peer => "runc",
    };
    let start = Instant::now();
    let pod_id = cri.run_pod(&pod, handler)?;
    let result = (|| -> anyhow::Result<()> {
        let cid = cri.create_container(&pod_id, &container, &pod)?;
        cri.start_container(&cid)?;
        Ok(())
    })();
    let stopped = cri.stop_pod(&pod_id);
    let removed = cri.remove_pod(&pod_id);
    let ms = start.elapsed().as_secs_f64() * 1e3;
    result?;
    stopped?;
    removed?;
    Ok(Sample { values: vec![("cri_pod_lifecycle", ms)], ..Default::default() })
}

/// The CNI network of the pod-network figures: a bridge of its own with host-local
/// addresses (the emulated host has no outside network; traffic stays between pods).
pub fn bench_cni_conflist() -> String {
    r#"{"cniVersion": "0.4.0", "name": "wisp-bench", "plugins": [
  {"type": "bridge", "bridge": "wispbench0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "subnet": "10.77.0.0/24", "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "loopback"}]}"#
        .to_string()
}

/// Bytes the throughput figure sends from one pod to another.
const NET_PAYLOAD_MIB: u64 = 64;
const NET_PORT: u16 = 5201;

/// Two pods on the CNI bridge (both wisp or both runc): seconds between the sender's
/// `nc` starting and ending (its own clock) while `NET_PAYLOAD_MIB` MiB of zeros go to
/// the other pod, which counts what arrives; Mbit/s.
pub fn net_throughput(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    use crate::cri::{ContainerConfig, Cri, PodConfig};
    let env = ctx.pods.get()?;
    let cri = Cri::connect(&env.containerd.socket)?;
    let logs = tempfile::tempdir()?;
    let handler = match side {
        Side::Wisp => "wisp",
        Side::Peer => "runc",
    };
    let mut pods = Vec::new();
    let result = (|| -> anyhow::Result<f64> {
        let mut containers = Vec::new();
        let mut ips = Vec::new();
        for role in ["sender", "receiver"] {
            let pod = PodConfig::new(&unique(role), logs.path()).build();
            let pod_id = cri.run_pod(&pod, handler)?;
            pods.push(pod_id.clone());
            let c = ContainerConfig::new(role, &env.image, &["sleep", "600"]).build();
            let cid = cri.create_container(&pod_id, &c, &pod)?;
            cri.start_container(&cid)?;
            let ip = cri.pod_status(&pod_id)?.0.network.map(|n| n.ip).unwrap_or_default();
            anyhow::ensure!(!ip.is_empty(), "pod {pod_id} has no IP");
            containers.push(cid);
            ips.push(ip);
        }
        let (sender, receiver) = (containers[0].clone(), containers[1].clone());
        // The receiver's nc gets a FIFO nobody writes to as stdin: at stdin EOF busybox
        // nc would close its side early.
        let recv = format!("rm -f /tmp/in && mkfifo /tmp/in && exec 3<>/tmp/in && nc -l -p {NET_PORT} <&3 | wc -c");
        let socket = env.containerd.socket.clone();
        let rx_thread = std::thread::spawn(move || -> anyhow::Result<String> {
            let c = Cri::connect(&socket)?;
            c.exec_ok(&receiver, &["sh", "-c", &recv])
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ls = cri.exec_ok(&containers[1], &["netstat", "-ltn"])?;
            if ls.lines().any(|l| l.contains(&format!(":{NET_PORT} "))) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the receiver does not listen after 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
        let send = format!(
            "s=$(cut -d' ' -f1 /proc/uptime); dd if=/dev/zero bs=1048576 count={NET_PAYLOAD_MIB} 2>/dev/null | \
             nc {} {NET_PORT} || exit 1; e=$(cut -d' ' -f1 /proc/uptime); echo \"$s $e\"",
            ips[1]
        );
        let out = cri.exec_ok(&sender, &["sh", "-c", &send])?;
        let got = rx_thread.join().map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
        anyhow::ensure!(
            got.trim() == (NET_PAYLOAD_MIB << 20).to_string(),
            "the receiver counted {:?} bytes, not {}",
            got.trim(),
            NET_PAYLOAD_MIB << 20
        );
        let t: Vec<f64> = out.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        anyhow::ensure!(t.len() == 2 && t[1] > t[0], "sender times {out:?}");
        Ok((NET_PAYLOAD_MIB << 20) as f64 * 8.0 / 1e6 / (t[1] - t[0]))
    })();
    for p in &pods {
        let _ = cri.stop_pod(p);
        let _ = cri.remove_pod(p);
    }
    Ok(Sample { values: vec![("net_throughput", result?)], ..Default::default() })
}
