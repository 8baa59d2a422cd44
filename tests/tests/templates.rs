//! VM templates end to end (`hypervisor.templates`, the shim's `template.rs` and
//! `vmstart.rs`): CRI pods on a CNI bridge in micro-VMs, in the emulated KVM host. The
//! first pod of a VM shape boots cold and becomes the template; the next ones are
//! restored from it. Checked here: restored pods are distinct machines (random numbers,
//! clock, hostname, MAC and address, and they reach each other), a changed kernel or VM
//! shape makes a new template, and a broken template costs a cold boot, not the pod.
//! Which path a pod took is read from the shim's own log lines in containerd's log.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use wisp_tests::cni::{conflist, need_cni};
use wisp_tests::containerd::{need_containerd, wisp_config, Containerd};
use wisp_tests::cri::{self, ContainerConfig, Cri, PodConfig};
use wisp_tests::harness::{need_full_kvm, need_root, CaseResult, Outcome, Suite};
use wisp_tests::procs::{STATE_DIR, TEMPLATES_DIR};
use wisp_tests::rootfs::need_busybox;
use wisp_tests::{ensure_that, need_built, skip_unless};

const WISP: &str = "wisp";
/// The MAC of a template's first NIC (`template_mac(0)` in the shim).
const TEMPLATE_MAC: &str = "02:77:69:73:70:00";

fn need_artifacts() -> Option<String> {
    need_built(&["release/containerd-shim-wisp-v2", "release/wisp-vmm", "guest/vmlinux", "guest/initrd.img"])
}

macro_rules! skip_unless_ready {
    () => {
        skip_unless!(need_root(), need_containerd(), need_busybox(), need_cni(), need_artifacts(), need_full_kvm())
    };
}

struct Env {
    c: Containerd,
    cri: Cri,
    image: String,
    /// The guest kernel the configuration names: a copy, so a case can replace it.
    kernel: PathBuf,
    scratch: tempfile::TempDir,
    pods: std::cell::RefCell<Vec<String>>,
}

fn env() -> anyhow::Result<Env> {
    wisp_tests::cni::reset();
    let scratch = tempfile::Builder::new().prefix("wisp-templates-").tempdir()?;
    let kernel = scratch.path().join("vmlinux");
    std::fs::copy(wisp_tests::artifact("guest/vmlinux"), &kernel)?;
    let toml = wisp_config("[runtime]\ndebug = true\nenable_annotations = [\"hypervisor.memory_mib\"]\n")
        .replace(&wisp_tests::artifact("guest/vmlinux").display().to_string(), &kernel.display().to_string());
    ensure_that!(toml.contains(&kernel.display().to_string()), "the configuration does not name the kernel copy");
    // Every case starts without templates: what an earlier case made would decide its path.
    let _ = std::fs::remove_dir_all(Path::new(STATE_DIR).join(TEMPLATES_DIR));
    let c = Containerd::start_with_cni(&toml, &[("10-wisp-cri-net.conflist", &conflist())])?;
    let (cri, image) = cri::connect_with_images(&c, "templates")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cri.conditions()?.get("NetworkReady").is_some_and(|(ok, _)| *ok) {
        ensure_that!(Instant::now() < deadline, "the CRI plugin's network is not ready after 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(Env { c, cri, image, kernel, scratch, pods: Default::default() })
}

/// How a pod's VM came up, from the shim's log.
#[derive(Debug, PartialEq)]
enum Start {
    /// Booted cold and became template `key`.
    Made(String),
    /// Restored from template `key`.
    Restored(String),
    /// Booted cold (no template involved, or a failed restore: `restore_failed`).
    Cold { restore_failed: bool },
}

impl Env {
    /// A pod on the CNI network with a sleeping container: its sandbox id.
    fn pod(&self, name: &str, annotations: &[(&str, &str)]) -> anyhow::Result<String> {
        let logs = self.scratch.path().join("logs").join(name);
        std::fs::create_dir_all(&logs)?;
        let mut pod = PodConfig::new(name, &logs);
        for (k, v) in annotations {
            pod = pod.annotation(k, v);
        }
        let pod = pod.build();
        let t = Instant::now();
        let sid = self.cri.run_pod(&pod, WISP).map_err(|e| anyhow!("{e}\n{}", self.c.diagnostics()))?;
        self.pods.borrow_mut().push(sid.clone());
        let sleeper = ContainerConfig::new("main", &self.image, &["sleep", "3600"]).build();
        let cid =
            self.cri.create_container(&sid, &sleeper, &pod).map_err(|e| anyhow!("{e}\n{}", self.c.diagnostics()))?;
        self.cri.start_container(&cid).map_err(|e| anyhow!("{e}\n{}", self.c.diagnostics()))?;
        eprintln!(
            "templates: pod {name} ({sid}) running after {:.1}s: {:?}",
            t.elapsed().as_secs_f64(),
            self.start(&sid)
        );
        Ok(cid)
    }

    /// The sandbox id of the pod `pod` started last.
    fn last_sid(&self) -> String {
        self.pods.borrow().last().cloned().unwrap_or_default()
    }

    /// How sandbox `sid`'s VM came up.
    fn start(&self, sid: &str) -> Start {
        let log = self.c.log();
        let key_after = |needle: &str| {
            log.lines()
                .find_map(|l| l.split_once(&format!("sandbox {sid}: {needle} ")).map(|(_, rest)| rest.to_string()))
                .map(|rest| rest.split([' ', ';', '"']).next().unwrap_or_default().to_string())
        };
        if let Some(k) = key_after("made template") {
            return Start::Made(k);
        }
        if let Some(k) = key_after("restored template") {
            return Start::Restored(k);
        }
        Start::Cold { restore_failed: key_after("restoring template").is_some() }
    }

    /// `sh -c script` in container `cid`, which must exit 0: its stdout.
    fn sh(&self, cid: &str, script: &str) -> anyhow::Result<String> {
        self.cri.exec_ok(cid, &["sh", "-c", script]).map_err(|e| anyhow!("{e:#}\n{}", self.c.diagnostics()))
    }

    fn pod_ip(&self, sid: &str) -> anyhow::Result<String> {
        let (status, _) = self.cri.pod_status(sid).map_err(|e| anyhow!("{e}"))?;
        Ok(status.network.map(|n| n.ip).unwrap_or_default())
    }

    fn templates(&self) -> Vec<String> {
        std::fs::read_dir(Path::new(STATE_DIR).join(TEMPLATES_DIR))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".lock"))
            .collect()
    }

    fn fail(&self, e: anyhow::Error) -> anyhow::Error {
        anyhow!("{e:#}\n{}", self.c.diagnostics())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for sid in self.pods.borrow().iter() {
            let _ = self.cri.stop_pod(sid);
            let _ = self.cri.remove_pod(sid);
        }
        wisp_tests::cni::delete_bridge();
    }
}

/// What a pod's guest says about itself: random bytes, clock, hostname, MAC, address.
#[derive(Debug)]
struct Identity {
    random: String,
    clock: u64,
    hostname: String,
    mac: String,
    ip: String,
    /// The kernel's boot id, made on its first read: after the restore, from the
    /// reseeded pool.
    boot_id: String,
}

fn identity(e: &Env, cid: &str) -> anyhow::Result<Identity> {
    let out = e.sh(
        cid,
        "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; hostname; \
         cat /sys/class/net/eth0/address; ip -4 -o addr show dev eth0; cat /proc/sys/kernel/random/boot_id",
    )?;
    let lines: Vec<&str> = out.lines().collect();
    ensure_that!(lines.len() >= 6, "the guest's answer is short: {out:?}");
    let ip = lines[4].split_whitespace().nth(3).and_then(|a| a.split('/').next()).unwrap_or_default();
    Ok(Identity {
        random: lines[0].into(),
        clock: lines[1].trim().parse().with_context(|| format!("date said {:?}", lines[1]))?,
        hostname: lines[2].into(),
        mac: lines[3].into(),
        ip: ip.into(),
        boot_id: lines[5].into(),
    })
}

fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

fn restored_pods_are_distinct_machines() -> CaseResult {
    skip_unless_ready!();
    let e = env()?;
    let first = e.pod("tmpl-first", &[])?;
    let Start::Made(key) = e.start(&e.last_sid()) else {
        bail!("the first pod did not make the template: {:?}\n{}", e.start(&e.last_sid()), e.c.diagnostics());
    };
    let mut pods = Vec::new();
    for name in ["tmpl-b", "tmpl-c"] {
        let cid = e.pod(name, &[])?;
        let sid = e.last_sid();
        ensure_that!(
            e.start(&sid) == Start::Restored(key.clone()),
            "{name}: {:?}, not restored from {key}\n{}",
            e.start(&sid),
            e.c.diagnostics()
        );
        pods.push((name, sid, cid));
    }
    let mut seen: Vec<Identity> = Vec::new();
    for (name, sid, cid) in &pods {
        let host_before = now();
        let id = identity(&e, cid).map_err(|x| e.fail(x))?;
        eprintln!("templates: {name}: {id:?}");
        ensure_that!(id.hostname == *name, "{name}: hostname {:?}", id.hostname);
        // The clock was set after the restore: not the template's time (the emulated
        // host is slow, so a few seconds either way).
        ensure_that!(
            id.clock + 30 >= host_before && id.clock <= now() + 30,
            "{name}: guest clock {} vs host {host_before}",
            id.clock
        );
        ensure_that!(id.mac != TEMPLATE_MAC, "{name}: eth0 kept the template's MAC");
        ensure_that!(id.ip == e.pod_ip(sid)?, "{name}: eth0 has {:?}, the CRI says {:?}", id.ip, e.pod_ip(sid)?);
        for other in &seen {
            ensure_that!(id.random != other.random, "two restored guests gave the same random bytes {}", id.random);
            ensure_that!(id.mac != other.mac && id.ip != other.ip, "{id:?} vs {other:?}");
            ensure_that!(id.boot_id != other.boot_id, "two restored guests have boot id {}", id.boot_id);
        }
        seen.push(id);
    }
    // The rewritten MACs carry traffic: each restored pod reaches the other and the
    // template's maker.
    let first_ip = e.pod_ip(&e.pods.borrow()[0])?;
    e.sh(&pods[0].2, &format!("ping -c 1 -W 10 {}", seen[1].ip))?;
    e.sh(&pods[1].2, &format!("ping -c 1 -W 10 {first_ip}"))?;
    e.sh(&first, &format!("ping -c 1 -W 10 {}", seen[0].ip))?;
    Ok(Outcome::Passed)
}

fn a_new_kernel_or_vm_shape_makes_a_new_template() -> CaseResult {
    skip_unless_ready!();
    let e = env()?;
    e.pod("shape-a", &[])?;
    let Start::Made(key) = e.start(&e.last_sid()) else { bail!("no template made: {:?}", e.start(&e.last_sid())) };
    // The same kernel file written anew: the template is stale, made again in place.
    let fresh = e.scratch.path().join("vmlinux.new");
    std::fs::copy(&e.kernel, &fresh)?;
    std::fs::rename(&fresh, &e.kernel)?;
    e.pod("shape-b", &[])?;
    ensure_that!(
        e.start(&e.last_sid()) == Start::Made(key.clone()),
        "after a kernel change: {:?}",
        e.start(&e.last_sid())
    );
    ensure_that!(e.templates() == vec![key.clone()], "templates: {:?}", e.templates());
    // Another VM shape (memory): a template of its own, the first one stays.
    e.pod("shape-c", &[("io.wisp.config.hypervisor.memory_mib", "320")])?;
    let Start::Made(other) = e.start(&e.last_sid()) else { bail!("320 MiB: {:?}", e.start(&e.last_sid())) };
    ensure_that!(other != key, "two shapes share template {key}");
    e.pod("shape-d", &[("io.wisp.config.hypervisor.memory_mib", "320")])?;
    ensure_that!(e.start(&e.last_sid()) == Start::Restored(other.clone()), "{:?}", e.start(&e.last_sid()));
    e.pod("shape-e", &[])?;
    ensure_that!(e.start(&e.last_sid()) == Start::Restored(key.clone()), "{:?}", e.start(&e.last_sid()));
    let mut all = e.templates();
    all.sort();
    let mut want = vec![key, other];
    want.sort();
    ensure_that!(all == want, "templates {all:?}, expected {want:?}");
    Ok(Outcome::Passed)
}

fn a_broken_template_costs_a_cold_boot_not_the_pod() -> CaseResult {
    skip_unless_ready!();
    let e = env()?;
    e.pod("broken-a", &[])?;
    let Start::Made(key) = e.start(&e.last_sid()) else { bail!("no template made: {:?}", e.start(&e.last_sid())) };
    // Damage the state file's body (its checksum no longer matches).
    let state = Path::new(STATE_DIR).join(TEMPLATES_DIR).join(&key).join("vm.snap");
    let mut bytes = std::fs::read(&state)?;
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&state, bytes)?;
    let cid = e.pod("broken-b", &[])?;
    ensure_that!(
        e.start(&e.last_sid()) == Start::Cold { restore_failed: true },
        "with a damaged template: {:?}\n{}",
        e.start(&e.last_sid()),
        e.c.diagnostics()
    );
    ensure_that!(e.sh(&cid, "echo up")?.trim() == "up", "the cold-booted pod does not run");
    // The broken template was removed: the next pod makes it again, the one after restores.
    ensure_that!(e.templates().is_empty(), "the broken template is still there: {:?}", e.templates());
    e.pod("broken-c", &[])?;
    ensure_that!(e.start(&e.last_sid()) == Start::Made(key.clone()), "{:?}", e.start(&e.last_sid()));
    e.pod("broken-d", &[])?;
    ensure_that!(e.start(&e.last_sid()) == Start::Restored(key), "{:?}", e.start(&e.last_sid()));
    Ok(Outcome::Passed)
}

fn main() {
    Suite::new("templates")
        .case("restored_pods_are_distinct_machines", restored_pods_are_distinct_machines)
        .case("a_new_kernel_or_vm_shape_makes_a_new_template", a_new_kernel_or_vm_shape_makes_a_new_template)
        .case("a_broken_template_costs_a_cold_boot_not_the_pod", a_broken_template_costs_a_cold_boot_not_the_pod)
        .run()
}
