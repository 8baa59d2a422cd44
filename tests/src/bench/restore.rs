//! VM snapshots at the VMM level (issue 18): a guest booted once to its agent is paused
//! and snapshotted through wisp-vmm's control API, and VMMs started from that snapshot
//! (`wisp-vmm --restore`) are held against the same VMM booting cold, in the same run.
//! These are the VMM's figures; the shim's templates (the pods' figures) are in
//! `pods.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;
use wisp_protocols::vmm::{Empty, SnapshotRequest};
use wisp_protocols::vmm_ttrpc::VmmClient;

use super::figures::check_agent;
use super::pods::rollup;
use super::timed::TimedChild;
use super::vms::{Side, MEMORY_MIB};
use super::{Ctx, Part, Sample};

/// How many VMs the memory figure runs at once on each side.
pub const VMS_AT_ONCE: usize = 10;

/// The snapshot every restored VM of this run starts from, made on first use.
struct Template {
    /// Holds the files. A static is never dropped, so the directory stays in the
    /// temporary directory after the run (in the emulated host, which is thrown away).
    _dir: tempfile::TempDir,
    state: PathBuf,
    memory: PathBuf,
}

static TEMPLATE: OnceLock<Result<Template, String>> = OnceLock::new();

fn template(ctx: &Ctx) -> anyhow::Result<&'static Template> {
    TEMPLATE
        .get_or_init(|| make_template(ctx).map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn api_client(api: &Path) -> anyhow::Result<VmmClient> {
    let c = ttrpc::Client::connect(&format!("unix://{}", api.display()))
        .with_context(|| format!("connecting to the control API {}", api.display()))?;
    Ok(VmmClient::new(c))
}

/// Boots a VM to its agent (as boot_to_agent does), lets the agent's connection close,
/// then pauses and snapshots it. A snapshot is refused while a vsock connection is still
/// closing (it carries none): the VM then runs on a moment and the snapshot is retried.
fn make_template(ctx: &Ctx) -> anyhow::Result<Template> {
    let dir = tempfile::tempdir()?;
    let (vsock, api) = (dir.path().join("template.vsock"), dir.path().join("template.api"));
    let mut vm = TimedChild::spawn("wisp-vmm (template)", &mut ctx.setup.wisp_with_agent(&vsock, &api))?;
    check_agent(&vm, &vsock, ctx.boot_timeout)?;
    let (state, memory) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
    let client = api_client(&api)?;
    let call = || ttrpc::context::with_timeout(60_000_000_000);
    let request = SnapshotRequest {
        state_path: state.display().to_string(),
        memory_path: memory.display().to_string(),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        client.pause(call(), &Empty::new()).context("Pause")?;
        match client.snapshot(call(), &request) {
            Ok(_) => break,
            Err(e) if e.to_string().contains("vsock connections") && Instant::now() < deadline => {
                client.resume(call(), &Empty::new()).context("Resume")?;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => anyhow::bail!("Snapshot: {e}; VMM output:\n{}", vm.transcript()),
        }
    }
    vm.stop()?;
    Ok(Template { _dir: dir, state, memory })
}

/// wisp-vmm restoring the template with new host ends: the options of
/// `Setup::wisp_with_agent` but for the boot images.
fn restore_command(ctx: &Ctx, t: &Template, vsock: &Path, api: &Path) -> Command {
    let mut c = Command::new(&ctx.setup.vmm);
    c.arg("--restore").arg(&t.state).arg("--restore-memory").arg(&t.memory);
    c.args(["--console", "stdout", "--vcpus", "1", "--memory-mib"]).arg(MEMORY_MIB.to_string());
    c.arg("--vsock-uds").arg(vsock).args(["--vsock-cid", "3"]);
    c.arg("--api-sock").arg(api).args(["--log-level", "info"]);
    c
}

/// Starts one VM to its agent's answer, restored or booted: the child and when the agent
/// answered.
fn start_to_agent(ctx: &Ctx, side: Side, dir: &Path, n: usize) -> anyhow::Result<(TimedChild, Instant)> {
    let (vsock, api) = (dir.join(format!("vm{n}.vsock")), dir.join(format!("vm{n}.api")));
    let mut cmd = match side {
        Side::Wisp => restore_command(ctx, template(ctx)?, &vsock, &api),
        Side::Peer => ctx.setup.wisp_with_agent(&vsock, &api),
    };
    let vm = TimedChild::spawn(if side == Side::Wisp { "wisp-vmm --restore" } else { "wisp-vmm (cold)" }, &mut cmd)?;
    let answered = check_agent(&vm, &vsock, ctx.boot_timeout)?;
    Ok((vm, answered))
}

/// The phases of a restore between the VMM's milestones, for the figure's parts: (from,
/// to, what happens). `AGENT` is the agent's answer.
const RESTORE_PHASES: [(&str, &str, &str); 6] = [
    (SPAWN, "snapshot_opened", "spawn, state file read and checked, memory file mapped"),
    ("snapshot_opened", "kvm_ready", "KVM VM on the mapped memory; irqchip, PIT and clock state"),
    ("kvm_ready", "devices_ready", "devices with their saved state"),
    ("devices_ready", "vcpu_state_loaded", "vCPU state (registers, MSRs, LAPIC, XSAVE, events)"),
    ("vcpu_state_loaded", "vcpus_started", "vCPU threads started"),
    ("vcpus_started", AGENT, "guest runs on (first page faults on the mapped memory) until the agent answers"),
];
const SPAWN: &str = "spawn";
const AGENT: &str = "agent answered";

/// wisp side: spawn of a VMM restoring the template until its agent answers Check, with
/// where the time went (`RESTORE_PHASES`, from the VMM's timeline); peer side: the same
/// VMM booting cold to the same answer.
pub fn restore_to_agent(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    let dir = tempfile::tempdir()?;
    let (mut vm, answered) = start_to_agent(ctx, side, dir.path(), 0)?;
    let ms = answered.duration_since(vm.started).as_secs_f64() * 1e3;
    let parts = match side {
        Side::Wisp => restore_phases(&vm, &dir.path().join("vm0.api"), ms),
        Side::Peer => Ok(Vec::new()),
    };
    vm.stop()?;
    Ok(Sample { values: vec![("restore_to_agent", ms)], parts: parts?, ..Default::default() })
}

/// The restore's phases in ms: the VMM's milestones (control API), shifted by its exec
/// delay, and the agent's answer at `answered_ms`.
fn restore_phases(vm: &TimedChild, api: &Path, answered_ms: f64) -> anyhow::Result<Vec<Part>> {
    let tl = api_client(api)?
        .boot_timeline(ttrpc::context::with_timeout(10_000_000_000), &Empty::new())
        .context("BootTimeline")?;
    let exec_ms = super::timeline::exec_delay_ms(vm.started, &vm.lines())?;
    let at = |name: &str| -> anyhow::Result<f64> {
        match name {
            SPAWN => Ok(0.0),
            AGENT => Ok(answered_ms),
            _ => tl
                .milestones
                .iter()
                .find(|m| m.name == name)
                .map(|m| exec_ms + m.at_us as f64 / 1e3)
                .with_context(|| format!("the restored VMM's timeline has no {name}")),
        }
    };
    RESTORE_PHASES
        .iter()
        .map(|(from, to, what)| {
            Ok(Part {
                figure: "restore_to_agent", label: format!("{from} → {to}: {what}"), value: at(to)? - at(from)?
            })
        })
        .collect()
}

/// `VMS_AT_ONCE` VMs each started to its agent's answer (restored, or booted cold),
/// then left idle for the settle time: the PSS of their VMM processes, per VM. Guest
/// pages a restored VM only read are one page-cache copy shared by all, so PSS splits
/// them between the VMs.
pub fn restored_vms_memory(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    let dir = tempfile::tempdir()?;
    let mut vms = Vec::new();
    let result = (|| -> anyhow::Result<f64> {
        for n in 0..VMS_AT_ONCE {
            vms.push(start_to_agent(ctx, side, dir.path(), n)?.0);
        }
        std::thread::sleep(ctx.settle);
        let mut total_kib = 0;
        for vm in &vms {
            total_kib += rollup(vm.pid())?.0;
        }
        Ok(total_kib as f64 / 1024.0 / VMS_AT_ONCE as f64)
    })();
    for vm in &mut vms {
        let _ = vm.stop();
    }
    Ok(Sample { values: vec![("vm_memory_pss_10", result?)], ..Default::default() })
}
