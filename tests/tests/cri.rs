//! containerd's CRI plugin end to end, driven the way the kubelet drives it (RunPodSandbox,
//! CreateContainer, ExecSync, ...) with runtime handler `wisp`: pods in micro-VMs with the
//! real shim, VMM, guest kernel and agent (in the emulated KVM host). Each case checks what
//! the pod's containers see and what is left on the host afterwards. The last case runs
//! the same lifecycle with `runc` in the same containerd: the harness itself is right.
//!
//! Images: the local busybox image and a local pause image (`sleep` forever), imported
//! into containerd's `k8s.io` namespace.
//!
//! Network: this suite configures no CNI network (pod networks are tests/cri_net.rs),
//! and containerd 1.6 runs no pod in a pod network namespace without one: with an empty CNI conf dir RunPodSandbox fails with "cni plugin
//! not initialized" (1.6.20; "cni config uninitialized" elsewhere), and with a network of
//! only the `loopback` plugin with "failed to find network info for sandbox" (it wants an
//! IP on eth0). Both are checked by a case (nothing of wisp may be left behind); the other
//! cases run host-network pods (for wisp, the VM has no network device then). Pods on a
//! real CNI network are the `cri_net` suite's.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use wisp_tests::containerd::{need_containerd, wisp_config, Containerd};
use wisp_tests::cri::{self, v1 as api, CallError, ContainerConfig, Cri, PodConfig};
use wisp_tests::harness::{need_full_kvm, need_root, CaseResult, Outcome, Suite};
use wisp_tests::procs::{
    all_vmm_pids, describe, host_kernel, mounts_in, mounts_under, parent, processes, serving_shim, shim_pids, vmm_pids,
    sandbox_dirs, wait_pod_gone, STATE_DIR,
};
use wisp_tests::rootfs::need_busybox;
use wisp_tests::{ensure_that, need_built, skip_unless};

const WISP: &str = "wisp";
const RUNC: &str = "runc";
/// wisp's state directory (the default; the test config does not change it).
/// Guest consoles go to /run/wisp/<sid>/console.log (shown when a case fails).
const DEBUG: &str = "[runtime]\ndebug = true\n";
/// How long a container may take to exit on its own, or teardown to finish, under TCG.
const SETTLE: Duration = Duration::from_secs(120);

fn need_artifacts() -> Option<String> {
    need_built(&["release/containerd-shim-wisp-v2", "release/wisp-vmm", "guest/vmlinux", "guest/initrd.img"])
}

macro_rules! skip_unless_wisp_ready {
    () => {
        skip_unless!(need_root(), need_containerd(), need_busybox(), need_artifacts(), need_full_kvm())
    };
}

struct Env {
    c: Containerd,
    cri: Cri,
    image: String,
    /// Pod log directories and host directories for volumes.
    scratch: tempfile::TempDir,
    /// Set by `pass`: otherwise dropping the Env prints what is needed to debug.
    passed: std::cell::Cell<bool>,
}

fn env() -> anyhow::Result<Env> {
    env_with(&wisp_config(DEBUG))
}

fn env_with(wisp_toml: &str) -> anyhow::Result<Env> {
    let c = Containerd::start(wisp_toml)?;
    let (cri, image) = cri::connect_with_images(&c, "cri")?;
    let scratch = tempfile::Builder::new().prefix("wisp-cri-").tempdir()?;
    Ok(Env { c, cri, image, scratch, passed: Default::default() })
}

impl Env {
    /// The case passed (its Env is dropped quietly).
    fn pass(&self) -> CaseResult {
        self.passed.set(true);
        Ok(Outcome::Passed)
    }

    /// A CRI error with containerd's log (shim logs included) and the guest consoles.
    fn diag(&self, e: CallError) -> anyhow::Error {
        anyhow!("{e}\n{}", self.c.diagnostics())
    }

    /// A host-network pod config with its own log directory.
    fn pod(&self, name: &str) -> anyhow::Result<PodConfig> {
        Ok(self.pod_with_netns(name)?.network(api::NamespaceMode::Node))
    }

    /// A pod config with a pod network namespace (CNI) and its own log directory.
    fn pod_with_netns(&self, name: &str) -> anyhow::Result<PodConfig> {
        let logs = self.scratch.path().join("logs").join(name);
        std::fs::create_dir_all(&logs)?;
        Ok(PodConfig::new(name, &logs))
    }

    /// A fresh host directory (an emptyDir-like volume).
    fn volume(&self, name: &str) -> anyhow::Result<PathBuf> {
        let d = self.scratch.path().join("volumes").join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    fn container(&self, name: &str, command: &[&str]) -> ContainerConfig {
        ContainerConfig::new(name, &self.image, command)
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

    fn exited(&self, id: &str) -> anyhow::Result<api::ContainerStatus> {
        self.cri
            .wait_container_state(id, api::ContainerState::ContainerExited, SETTLE)
            .map_err(|e| anyhow!("{e:#}\n{}", self.c.diagnostics()))
    }

    fn running(&self, id: &str) -> anyhow::Result<()> {
        let s = self.cri.container_status(id).map_err(|e| self.diag(e))?;
        ensure_that!(s.state == api::ContainerState::ContainerRunning as i32, "container {id} is not RUNNING: {s:?}");
        Ok(())
    }

    fn exec(&self, id: &str, cmd: &[&str]) -> anyhow::Result<String> {
        self.cri.exec_ok(id, cmd).map_err(|e| anyhow!("{e:#}\n{}", self.c.diagnostics()))
    }

    /// StopPodSandbox + RemovePodSandbox.
    fn remove_pod(&self, id: &str) -> anyhow::Result<()> {
        let t = Instant::now();
        self.cri.stop_pod(id).map_err(|e| self.diag(e))?;
        self.cri.remove_pod(id).map_err(|e| self.diag(e))?;
        eprintln!("cri: pod {id} stopped and removed in {:.1}s", t.elapsed().as_secs_f64());
        Ok(())
    }

    /// The pod's VM is running: its state directory and one wisp-vmm of its own.
    fn assert_vm(&self, sid: &str) -> anyhow::Result<u32> {
        let dir = Path::new(STATE_DIR).join(sid);
        ensure_that!(dir.is_dir(), "{} does not exist", dir.display());
        let vmms = vmm_pids(sid);
        ensure_that!(vmms.len() == 1, "pod {sid} has wisp-vmm processes {vmms:?}, want exactly one");
        Ok(vmms[0])
    }

    /// After a refused RunPodSandbox (whose pod id the caller never learns): no wisp
    /// process or state at all. containerd may keep the failed pod as NOTREADY for the
    /// kubelet to stop and remove: that is done too, and must not change the picture.
    fn assert_refused_pod_left_nothing(&self, what: &str) -> anyhow::Result<()> {
        self.assert_no_wisp_left(what)?;
        self.remove_refused_pods(what)
    }

    /// Stops and removes the pods a refused RunPodSandbox left (NOTREADY, as the kubelet
    /// does); then no pod and nothing of wisp may be left.
    fn remove_refused_pods(&self, what: &str) -> anyhow::Result<()> {
        for p in self.cri.list_pods()? {
            ensure_that!(
                p.state == api::PodSandboxState::SandboxNotready as i32,
                "{what}: a pod is listed as ready: {p:?}"
            );
            self.cri.stop_pod(&p.id).map_err(|e| self.diag(e))?;
            self.cri.remove_pod(&p.id).map_err(|e| self.diag(e))?;
        }
        let pods = self.cri.list_pods()?;
        ensure_that!(pods.is_empty(), "{what}: pods listed after StopPodSandbox + RemovePodSandbox: {pods:?}");
        self.assert_no_wisp_left(what)
    }

    /// No wisp-vmm, no shim, nothing in the state dir.
    fn assert_no_wisp_left(&self, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + SETTLE;
        loop {
            let dirs = sandbox_dirs();
            let (vmms, shims) = (all_vmm_pids(), self.shims());
            if dirs.is_empty() && vmms.is_empty() && shims.is_empty() {
                return Ok(());
            }
            ensure_that!(Instant::now() < deadline, "{what} left: dirs {dirs:?}, wisp-vmm {vmms:?}, shims {shims:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Nothing of the pod's VM is left: no wisp-vmm, no state dir, no mounts under it,
    /// no shim (waits up to SETTLE: teardown continues after the CRI call returns).
    fn assert_vm_gone(&self, sid: &str) -> anyhow::Result<()> {
        wait_pod_gone(sid, SETTLE).map_err(|left| anyhow!("{left}\n{}", self.c.diagnostics()))
    }
}

impl Drop for Env {
    /// A case that failed halfway leaves pods: stop and remove them while containerd runs.
    fn drop(&mut self) {
        if !self.passed.get() {
            let log = self.c.log();
            let lines: Vec<&str> = log.lines().filter(|l| !l.contains("level=debug") && !l.trim().is_empty()).collect();
            eprintln!(
                "--- containerd log without debug lines (last 250) ---\n{}",
                lines[lines.len().saturating_sub(250)..].join("\n")
            );
            for pid in all_vmm_pids().into_iter().chain(self.shims()) {
                eprintln!("--- still running ---\n{}", describe(pid));
            }
        }
        for p in self.cri.list_pods().unwrap_or_default() {
            eprintln!("cri: cleaning up pod {}", p.id);
            let _ = self.cri.stop_pod(&p.id);
            let _ = self.cri.remove_pod(&p.id);
        }
        // Shims of this containerd that outlived their pods (a failure already reported),
        // and their VMMs: killed, so that the next case starts clean.
        let shims = self.shims();
        let vmms: Vec<u32> =
            all_vmm_pids().into_iter().filter(|p| parent(*p).is_some_and(|pp| shims.contains(&pp))).collect();
        for pid in vmms.into_iter().chain(shims) {
            eprintln!("cri: killing leftover {}", describe(pid).lines().next().unwrap_or_default());
            // SAFETY: kill(2) on a process this test's containerd started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

impl Env {
    /// The wisp shims this containerd started (`-address <its socket>`).
    fn shims(&self) -> Vec<u32> {
        let address = self.c.socket.display().to_string();
        processes("containerd-shim-wisp-v2", |args| args.windows(2).any(|w| w[0] == "-address" && w[1] == address))
    }
}

/// The container's CRI log, parsed, once `want` holds for it (the log may trail the exit).
fn read_log(
    pod: &api::PodSandboxConfig,
    c: &api::ContainerConfig,
    want: impl Fn(&[cri::LogEntry]) -> bool,
) -> anyhow::Result<Vec<cri::LogEntry>> {
    let path = cri::log_file(pod, c);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let entries = cri::parse_log(&text)?;
        if want(&entries) || Instant::now() > deadline {
            eprintln!("cri: {} has {} entries", path.display(), entries.len());
            return Ok(entries);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

// ---- cases ----

/// RunPodSandbox boots the pod's VM; a container's `uname -r` is the guest's kernel.
fn pod_runs_in_its_own_vm() -> CaseResult {
    skip_unless_wisp_ready!();
    let e = env()?;
    let pod = e.pod("uname")?.build();
    let sid = e.run_pod(&pod, WISP)?;
    e.assert_vm(&sid)?;
    let (status, info) = e.cri.pod_status(&sid)?;
    ensure_that!(
        status.metadata.as_ref().is_some_and(|m| m.name == "uname"),
        "pod status metadata: {:?}",
        status.metadata
    );
    // containerd's verbose info: the handler's runtime type and the sandbox task's pid,
    // which for wisp is the shim's.
    let info: serde_json::Value = serde_json::from_str(info.get("info").map(String::as_str).unwrap_or("{}"))?;
    ensure_that!(info["runtimeType"] == "io.containerd.wisp.v2", "pod runtime type: {}", info["runtimeType"]);
    let shims = shim_pids(&sid);
    ensure_that!(
        shims.len() == 1 && info["pid"].as_u64() == Some(u64::from(shims[0])),
        "sandbox task pid {} vs shim processes {shims:?}",
        info["pid"]
    );

    let c = e.container("uname", &["uname", "-r"]).build();
    let cid = e.start(&sid, &pod, &c)?;
    let st = e.exited(&cid)?;
    ensure_that!(st.exit_code == 0, "uname -r exited {}: {st:?}", st.exit_code);
    let log = read_log(&pod, &c, |l| !cri::stream_lines(l, "stdout").is_empty())?;
    let out = cri::stream_lines(&log, "stdout");
    let host = host_kernel()?;
    ensure_that!(out.len() == 1 && !out[0].is_empty(), "uname -r logged {log:?}");
    ensure_that!(out[0] != host, "the container runs the host's kernel {host:?}, not a guest's");
    ensure_that!(log.iter().all(|l| l.stream == "stdout"), "unexpected stderr from uname: {log:?}");
    eprintln!("cri: guest kernel {:?}, host {host:?}", out[0]);
    e.remove_pod(&sid)?;
    e.assert_vm_gone(&sid)?;
    e.pass()
}

/// Two containers of one pod share its VM (same guest boot id, one wisp-vmm) and a
/// host directory mounted into both.
fn containers_share_the_pod_vm() -> CaseResult {
    skip_unless_wisp_ready!();
    let e = env()?;
    let pod = e.pod("pair")?.build();
    let sid = e.run_pod(&pod, WISP)?;
    let shared = e.volume("pair-shared")?;
    let a = e.start(&sid, &pod, &e.container("a", &["sleep", "600"]).mount(&shared, "/shared", false).build())?;
    let b = e.start(&sid, &pod, &e.container("b", &["sleep", "600"]).mount(&shared, "/shared", false).build())?;
    e.running(&a)?;
    e.running(&b)?;

    let boot_a = e.exec(&a, &["cat", "/proc/sys/kernel/random/boot_id"])?;
    let boot_b = e.exec(&b, &["cat", "/proc/sys/kernel/random/boot_id"])?;
    let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")?;
    ensure_that!(boot_a.trim().len() == 36, "boot id from a: {boot_a:?}");
    ensure_that!(boot_a == boot_b, "containers of one pod see different kernels: {boot_a:?} vs {boot_b:?}");
    ensure_that!(boot_a.trim() != host_boot.trim(), "the containers see the host's boot id");
    e.assert_vm(&sid)?;
    let all = all_vmm_pids();
    ensure_that!(all.len() == 1, "one pod, wisp-vmm processes {all:?}");

    e.exec(&a, &["sh", "-c", "echo written-by-a > /shared/note"])?;
    let seen = e.exec(&b, &["cat", "/shared/note"])?;
    ensure_that!(seen.trim() == "written-by-a", "b reads {seen:?} from the shared volume");
    let on_host = std::fs::read_to_string(shared.join("note"))?;
    ensure_that!(on_host.trim() == "written-by-a", "the host directory holds {on_host:?}");
    // Each container reaches the volume through its own path on the share, so a change
    // made through one shows in the other once the guest's cached attributes expire (the
    // share's cache mode "auto": about a second). The give-up bound is far beyond that:
    // it only tells "never visible" from "visible", it is not a speed claim.
    e.exec(&b, &["sh", "-c", "echo reply-from-b >> /shared/note"])?;
    let t = Instant::now();
    loop {
        let seen = e.exec(&a, &["cat", "/shared/note"])?;
        if seen.lines().collect::<Vec<_>>() == ["written-by-a", "reply-from-b"] {
            break;
        }
        ensure_that!(t.elapsed() < Duration::from_secs(120), "b's append never became visible to a: a reads {seen:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("cri: b's append visible to a after {:.1}s", t.elapsed().as_secs_f64());

    e.remove_pod(&sid)?;
    e.assert_vm_gone(&sid)?;
    e.pass()
}

/// ExecSync returns stdout, stderr and the exit code apart; its timeout ends the process.
fn exec_sync_streams_exit_code_and_timeout() -> CaseResult {
    skip_unless_wisp_ready!();
    let e = env()?;
    let pod = e.pod("exec")?.build();
    let sid = e.run_pod(&pod, WISP)?;
    let cid = e.start(&sid, &pod, &e.container("main", &["sleep", "600"]).build())?;

    let r = e.cri.exec_sync(&cid, &["sh", "-c", "echo out; echo err >&2; exit 3"], 0).map_err(|x| e.diag(x))?;
    ensure_that!(r.exit_code == 3, "exit code {} (want 3): {r:?}", r.exit_code);
    ensure_that!(r.stdout == "out\n" && r.stderr == "err\n", "streams: stdout {:?}, stderr {:?}", r.stdout, r.stderr);
    let r = e.cri.exec_sync(&cid, &["sh", "-c", "seq 1 20000"], 0).map_err(|x| e.diag(x))?;
    ensure_that!(
        r.exit_code == 0 && r.stdout.lines().count() == 20000,
        "seq: exit {}, {} lines",
        r.exit_code,
        r.stdout.lines().count()
    );

    // containerd kills the exec at the timeout and answers with an error. The client
    // gives up 60 s after the exec's timeout (code None), well before the sleep would
    // end: an answer at all means the exec was ended at its timeout, not at its end.
    let t = Instant::now();
    let r = e.cri.exec_sync(&cid, &["sleep", "77"], 2);
    let took = t.elapsed();
    match r {
        Err(err) => ensure_that!(
            err.code.is_some() && err.message.contains("timeout"),
            "timed-out exec, want containerd's timeout error: {err}"
        ),
        Ok(r) => bail!("exec sleep 77 with a 2 s timeout returned {r:?} after {took:?}"),
    }
    let ps = e.exec(&cid, &["ps", "-o", "args"])?;
    ensure_that!(!ps.lines().any(|l| l.trim() == "sleep 77"), "the timed-out exec still runs:\n{ps}");
    e.running(&cid)?;
    eprintln!("cri: exec timeout answered after {:.1}s", took.as_secs_f64());

    e.remove_pod(&sid)?;
    e.assert_vm_gone(&sid)?;
    e.pass()
}

/// ExecSync of a binary the container does not have fails with an answer (an error or a
/// non-zero exit; the client's call deadline only turns a hang into a failure), the
/// container still runs, and nothing is left behind once the pod is gone.
fn exec_sync_of_a_missing_binary_fails() -> CaseResult {
    skip_unless_wisp_ready!();
    let e = env()?;
    let pod = e.pod("noexec")?.build();
    let sid = e.run_pod(&pod, WISP)?;
    let cid = e.start(&sid, &pod, &e.container("main", &["sleep", "600"]).build())?;
    let t = Instant::now();
    let r = e.cri.exec_sync(&cid, &["/no/such/binary"], 0);
    let took = t.elapsed();
    eprintln!("cri: exec of a missing binary: {r:?} after {:.1}s", took.as_secs_f64());
    match &r {
        Ok(r) => ensure_that!(r.exit_code != 0, "a missing binary ran: {r:?}"),
        Err(err) => ensure_that!(err.code.is_some(), "ExecSync of a missing binary hung: {err}"),
    }
    e.running(&cid)?;
    e.exec(&cid, &["true"])?;
    e.remove_pod(&sid)?;
    e.assert_vm_gone(&sid)?;
    e.pass()
}

/// A container's stdout and stderr end up in its CRI log file, tagged and complete,
/// once it has exited with its exit code.
fn container_logs_complete_after_exit() -> CaseResult {
    skip_unless_wisp_ready!();
    let e = env()?;
    let pod = e.pod("logs")?.build();
    let sid = e.run_pod(&pod, WISP)?;
    // 20000 bytes: longer than containerd's 16 KiB log line limit, so split into P + F.
    let script = "i=1; while [ $i -le 200 ]; do echo out-$i; echo err-$i >&2; i=$((i+1)); done; \
                  head -c 20000 /dev/zero | tr '\\0' x; echo; echo last-out; echo last-err >&2; exit 4";
    let c = e.container("talker", &["sh", "-c", script]).build();
    let cid = e.start(&sid, &pod, &c)?;
    let st = e.exited(&cid)?;
    ensure_that!(st.exit_code == 4, "exit code {} (want 4): {st:?}", st.exit_code);
    ensure_that!(st.finished_at >= st.started_at && st.started_at > 0, "times: {st:?}");

    let mut want_out: Vec<String> = (1..=200).map(|i| format!("out-{i}")).collect();
    want_out.push("x".repeat(20000));
    want_out.push("last-out".into());
    let mut want_err: Vec<String> = (1..=200).map(|i| format!("err-{i}")).collect();
    want_err.push("last-err".into());
    let log = read_log(&pod, &c, |l| {
        cri::stream_lines(l, "stdout").len() >= want_out.len() && cri::stream_lines(l, "stderr").len() >= want_err.len()
    })?;
    let (out, err) = (cri::stream_lines(&log, "stdout"), cri::stream_lines(&log, "stderr"));
    ensure_that!(
        out == want_out,
        "stdout in the log: {} lines, first {:?}, last {:?}",
        out.len(),
        out.first(),
        out.last()
    );
    ensure_that!(
        err == want_err,
        "stderr in the log: {} lines, first {:?}, last {:?}",
        err.len(),
        err.first(),
        err.last()
    );
    ensure_that!(log.iter().any(|l| l.partial), "the 20000-byte line was not split into partial entries");
    ensure_that!(st.log_path == cri::log_file(&pod, &c).display().to_string(), "status log path {:?}", st.log_path);

    e.remove_pod(&sid)?;
    e.assert_vm_gone(&sid)?;
    e.pass()
}

/// ContainerStats of a running container: CPU time and memory working set from the guest.
fn container_stats() -> CaseResult {
    skip_unless_wisp_ready!();
    let e = env()?;
    let pod = e.pod("stats")?.build();
    let sid = e.run_pod(&pod, WISP)?;
    // Some CPU work and some memory first, so neither figure can be an idle zero.
    let script =
        "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; x=$(head -c 4000000 /dev/zero | tr '\\0' y); sleep 600";
    let cid = e.start(&sid, &pod, &e.container("busy", &["sh", "-c", script]).build())?;
    e.running(&cid)?;
    let s = e.cri.container_stats(&cid).map_err(|x| e.diag(x))?;
    ensure_that!(s.attributes.as_ref().is_some_and(|a| a.id == cid), "stats attributes: {:?}", s.attributes);
    let cpu = s.cpu.as_ref().and_then(|c| c.usage_core_nano_seconds.as_ref()).map(|v| v.value);
    let ws = s.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref()).map(|v| v.value);
    ensure_that!(cpu.is_some_and(|v| v > 0), "cpu usage_core_nano_seconds {cpu:?}: {s:?}");
    ensure_that!(ws.is_some_and(|v| v > 0), "memory working_set_bytes {ws:?}: {s:?}");
    ensure_that!(ws.is_some_and(|v| v < 1 << 30), "working set {ws:?} is more than the VM has");
    eprintln!("cri: stats cpu {cpu:?} ns, working set {ws:?} bytes");
    let s2 = e.cri.container_stats(&cid).map_err(|x| e.diag(x))?;
    let cpu2 = s2.cpu.as_ref().and_then(|c| c.usage_core_nano_seconds.as_ref()).map(|v| v.value);
    ensure_that!(cpu2 >= cpu, "cpu time went backwards: {cpu:?} then {cpu2:?}");

    e.remove_pod(&sid)?;
    e.assert_vm_gone(&sid)?;
    e.pass()
}

/// StopPodSandbox ends the VM; RemovePodSandbox leaves no VMM, state dir, mount or shim.
/// While the pod runs, its mounts exist in its shim's mount namespace, not the host's.
fn stop_and_remove_leave_nothing() -> CaseResult {
    skip_unless_wisp_ready!();
    let e = env()?;
    let pod = e.pod("gone")?.build();
    let sid = e.run_pod(&pod, WISP)?;
    let vol = e.volume("gone-vol")?;
    let cid = e.start(&sid, &pod, &e.container("main", &["sleep", "600"]).mount(&vol, "/data", false).build())?;
    e.running(&cid)?;
    let vmm = e.assert_vm(&sid)?;
    let shims = shim_pids(&sid);
    ensure_that!(shims.len() == 1, "pod {sid}: shim processes {shims:?}, want one");
    let dir = Path::new(STATE_DIR).join(&sid);
    let mounts = mounts_in(serving_shim(&sid)?, &[&dir]);
    ensure_that!(
        !mounts.is_empty(),
        "no mounts under {} in the shim's namespace while the pod runs: the check below would prove nothing",
        dir.display()
    );
    let on_host = mounts_under(&[&dir]);
    ensure_that!(on_host.is_empty(), "the pod's mounts are in the host's mount namespace: {on_host:?}");
    eprintln!("cri: pod {sid}: vmm {vmm}, shim {shims:?}, {} mounts in the shim's namespace", mounts.len());

    e.cri.stop_pod(&sid).map_err(|x| e.diag(x))?;
    let (status, _) = e.cri.pod_status(&sid).map_err(|x| e.diag(x))?;
    ensure_that!(status.state == api::PodSandboxState::SandboxNotready as i32, "stopped pod is {:?}", status.state);
    let st = e.cri.container_status(&cid).map_err(|x| e.diag(x))?;
    ensure_that!(st.state == api::ContainerState::ContainerExited as i32, "container of a stopped pod: {st:?}");
    let deadline = Instant::now() + SETTLE;
    while !vmm_pids(&sid).is_empty() {
        ensure_that!(Instant::now() < deadline, "wisp-vmm {vmm} still runs {SETTLE:?} after StopPodSandbox");
        std::thread::sleep(Duration::from_millis(200));
    }
    e.cri.remove_pod(&sid).map_err(|x| e.diag(x))?;
    e.assert_vm_gone(&sid)?;
    ensure_that!(e.cri.list_pods()?.iter().all(|p| p.id != sid), "RemovePodSandbox left the pod listed");
    ensure_that!(vol.is_dir(), "the volume's host directory went away with the pod");
    e.pass()
}

/// Pod annotations wisp refuses make RunPodSandbox fail naming the key, with nothing
/// left behind; an allowed one takes effect.
fn refused_annotations_fail_run_pod_sandbox() -> CaseResult {
    skip_unless_wisp_ready!();
    let e = env_with(&wisp_config("[runtime]\ndebug = true\nenable_annotations = [\"hypervisor.memory_mib\"]\n"))?;
    let refused = [
        ("not-enabled", "io.wisp.config.hypervisor.vcpus", "2", "hypervisor.vcpus"),
        ("bad-value", "io.wisp.config.hypervisor.memory_mib", "lots", "memory_mib"),
        ("no-such-key", "io.wisp.config.hypervisor.vcpu", "2", "hypervisor.vcpu"),
    ];
    for (name, key, value, named) in refused {
        let pod = e.pod(name)?.annotation(key, value).build();
        match e.cri.run_pod(&pod, WISP) {
            Ok(id) => bail!("RunPodSandbox with {key}={value} succeeded: pod {id}"),
            Err(err) => ensure_that!(
                err.message.contains(named),
                "RunPodSandbox with {key}={value}: error does not name {named}: {err}"
            ),
        }
        e.assert_refused_pod_left_nothing(&format!("refused pod {name}"))?;
    }

    let pod = e.pod("allowed")?.annotation("io.wisp.config.hypervisor.memory_mib", "192").build();
    let sid = e.run_pod(&pod, WISP)?;
    let cid = e.start(&sid, &pod, &e.container("main", &["sleep", "600"]).build())?;
    let mem = e.exec(&cid, &["grep", "MemTotal", "/proc/meminfo"])?;
    let kib: u64 =
        mem.split_whitespace().nth(1).and_then(|v| v.parse().ok()).ok_or_else(|| anyhow!("MemTotal: {mem:?}"))?;
    ensure_that!(kib > 100 * 1024 && kib <= 192 * 1024, "memory_mib=192 gives MemTotal {kib} kB");
    e.remove_pod(&sid)?;
    e.assert_vm_gone(&sid)?;
    e.pass()
}

/// Without a CNI network containerd refuses pods that have their own network namespace,
/// before the runtime is involved: no VM is started and nothing is left behind. Checked
/// with an empty CNI conf dir, then with a network of only the `loopback` plugin.
fn pod_network_needs_a_cni_network() -> CaseResult {
    skip_unless_wisp_ready!();
    let e = env()?;
    let ready =
        |e: &Env| -> anyhow::Result<Option<bool>> { Ok(e.cri.conditions()?.get("NetworkReady").map(|(ok, _)| *ok)) };
    ensure_that!(ready(&e)? == Some(false), "NetworkReady with an empty CNI conf dir: {:?}", e.cri.conditions()?);
    // containerd 1.6.20 says "cni plugin not initialized", others "cni config uninitialized".
    let refuse = |step: &str, want: &str| -> anyhow::Result<()> {
        for handler in [RUNC, WISP] {
            let name = format!("{step}-{handler}");
            let pod = e.pod_with_netns(&name)?.build();
            match e.cri.run_pod(&pod, handler) {
                Ok(id) => bail!("RunPodSandbox of {name} succeeded without a CNI network: pod {id}"),
                Err(err) => {
                    ensure_that!(err.message.contains(want), "RunPodSandbox of {name}: want {want:?}, got: {err}")
                }
            }
            e.assert_no_wisp_left(&name)?;
        }
        Ok(())
    };
    refuse("no-cni", "initialized")?;
    // containerd keeps the failed pods as NOTREADY, and cannot stop them (tear their
    // network down) before it has a CNI network either: that comes next.
    let tmp = e.c.cni_dir().join("loopback.tmp");
    std::fs::write(&tmp, cri::loopback_cni_conflist())?;
    // Renamed into place: containerd reloads the conf dir on every change.
    std::fs::rename(&tmp, e.c.cni_dir().join("10-loopback.conflist"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(&e)? != Some(true) {
        ensure_that!(
            Instant::now() < deadline,
            "the loopback network did not make NetworkReady: {:?}",
            e.cri.conditions()?
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    e.remove_refused_pods("no-cni")?;
    refuse("lo-only", "failed to find network info")?;
    e.remove_refused_pods("lo-only")?;
    e.pass()
}

/// The same pod lifecycle with runc in the same containerd: the harness is right, and
/// runc's containers see the host's kernel.
fn runc_pod_lifecycle() -> CaseResult {
    skip_unless!(need_root(), need_containerd(), need_busybox());
    let e = env()?;
    let pod = e.pod("runc")?.build();
    let sid = e.run_pod(&pod, RUNC)?;
    let (_, info) = e.cri.pod_status(&sid)?;
    let info: serde_json::Value = serde_json::from_str(info.get("info").map(String::as_str).unwrap_or("{}"))?;
    ensure_that!(info["runtimeType"] == "io.containerd.runc.v2", "pod runtime type: {}", info["runtimeType"]);
    let c = e.container("uname", &["uname", "-r"]).build();
    let cid = e.start(&sid, &pod, &c)?;
    let st = e.exited(&cid)?;
    ensure_that!(st.exit_code == 0, "uname -r exited {}: {st:?}", st.exit_code);
    let log = read_log(&pod, &c, |l| !cri::stream_lines(l, "stdout").is_empty())?;
    let out = cri::stream_lines(&log, "stdout");
    ensure_that!(out == [host_kernel()?], "runc's uname -r logged {out:?}, not the host's kernel");

    let vol = e.volume("runc-vol")?;
    let a = e.start(&sid, &pod, &e.container("a", &["sleep", "600"]).mount(&vol, "/shared", false).build())?;
    let r = e.cri.exec_sync(&a, &["sh", "-c", "echo out; echo err >&2; echo via-runc > /shared/f; exit 3"], 0)?;
    ensure_that!((r.exit_code, r.stdout.as_str(), r.stderr.as_str()) == (3, "out\n", "err\n"), "runc exec: {r:?}");
    ensure_that!(std::fs::read_to_string(vol.join("f"))?.trim() == "via-runc", "runc volume write not on the host");
    let t = Instant::now();
    let r = e.cri.exec_sync(&a, &["/no/such/binary"], 0);
    eprintln!("cri: runc exec of a missing binary: {r:?} after {:.1}s", t.elapsed().as_secs_f64());
    ensure_that!(r.as_ref().map_or(true, |r| r.exit_code != 0), "a missing binary ran: {r:?}");
    let s = e.cri.container_stats(&a)?;
    ensure_that!(
        s.memory.as_ref().and_then(|m| m.working_set_bytes.as_ref()).is_some_and(|v| v.value > 0),
        "runc stats: {s:?}"
    );
    e.remove_pod(&sid)?;
    ensure_that!(e.cri.list_pods()?.is_empty(), "runc pod still listed");
    ensure_that!(all_vmm_pids().is_empty() && e.shims().is_empty(), "a runc pod started wisp processes");
    e.pass()
}

/// An image's setuid-root binary works for a non-root user, in a wisp pod as in a runc
/// pod (Kubernetes' default allowPrivilegeEscalation): the guest mounts the share
/// without nosuid, while the host's mounts of the same files are nosuid (hostile suite).
fn image_setuid_binaries_work_as_with_runc() -> CaseResult {
    skip_unless_wisp_ready!();
    let e = env()?;
    let bin = wisp_tests::image::build_euid_probe(e.scratch.path())?;
    let archive = e.scratch.path().join("suid.tar");
    let image = "docker.io/library/busybox:wisp-suid";
    wisp_tests::image::build_image_with(&archive, image, &["sh"], &[("bin/euid", &bin, 0o4755)])?;
    e.c.import(wisp_tests::containerd::CRI_NAMESPACE, &archive, image)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !e.cri.image_present(image)? {
        ensure_that!(Instant::now() < deadline, "the CRI plugin does not list {image} after importing it");
        std::thread::sleep(Duration::from_millis(100));
    }
    for handler in [RUNC, WISP] {
        let pod = e.pod(&format!("suid-{handler}"))?.build();
        let sid = e.run_pod(&pod, handler)?;
        let config = ContainerConfig::new("app", image, &["sleep", "600"])
            .edit(|c| {
                c.linux = Some(api::LinuxContainerConfig {
                    security_context: Some(api::LinuxContainerSecurityContext {
                        run_as_user: Some(api::Int64Value { value: 1000 }),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
            })
            .build();
        let id = e.start(&sid, &pod, &config)?;
        let out = e.exec(&id, &["/bin/euid"])?;
        ensure_that!(
            out.trim() == "euid=0 uid=1000",
            "{handler}: the image's setuid-root binary ran as {:?}",
            out.trim()
        );
        e.remove_pod(&sid)?;
    }
    e.pass()
}

fn main() {
    Suite::new("cri")
        .case("pod_runs_in_its_own_vm", pod_runs_in_its_own_vm)
        .case("containers_share_the_pod_vm", containers_share_the_pod_vm)
        .case("exec_sync_streams_exit_code_and_timeout", exec_sync_streams_exit_code_and_timeout)
        .case("exec_sync_of_a_missing_binary_fails", exec_sync_of_a_missing_binary_fails)
        .case("container_logs_complete_after_exit", container_logs_complete_after_exit)
        .case("container_stats", container_stats)
        .case("stop_and_remove_leave_nothing", stop_and_remove_leave_nothing)
        .case("refused_annotations_fail_run_pod_sandbox", refused_annotations_fail_run_pod_sandbox)
        .case("pod_network_needs_a_cni_network", pod_network_needs_a_cni_network)
        .case("runc_pod_lifecycle", runc_pod_lifecycle)
        .case("image_setuid_binaries_work_as_with_runc", image_setuid_binaries_work_as_with_runc)
        .run()
}
