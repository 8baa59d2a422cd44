//! The figures of `make bench`: the experiments that measure them and the figures
//! that wait for components still being built (listed with the reason).

use std::time::Duration;

use anyhow::Context;
use wisp_protocols::vmm::Empty;
use wisp_protocols::vmm_ttrpc::VmmClient;

use super::smaps::{vmm_memory, Anchor};
use super::timed::TimedChild;
use super::timeline::{self, Timeline};
use super::vms::{Side, MEMORY_MIB, PEER_NAME, USERSPACE_MARKER};
use super::{Ctx, Experiment, FigureSpec, Part, Sample, Target};

const MIB: f64 = 1024.0 * 1024.0;
/// How long a wisp-vmm gets to end by itself after its guest rebooted.
const EXIT_GRACE: Duration = Duration::from_secs(60);

pub fn experiments() -> Vec<Experiment> {
    vec![
        Experiment {
            name: "boot",
            run: boot_to_userspace,
            figures: vec![FigureSpec {
                name: "boot_to_userspace",
                unit: "ms",
                peer_name: PEER_NAME,
                target: Target::RatioAtMost(0.5),
                target_text: "<= 0.5x QEMU microvm",
                note: "VMM process spawn until `WISP-TEST-INIT-STARTED` (the test initrd's /init) reaches the host \
                       on the serial console; 1 vCPU, 128 MiB, same vmlinux + initrd, cmdline \
                       `console=ttyS0 reboot=k panic=-1`.",
            }],
        },
        Experiment {
            name: "idle_memory",
            run: idle_memory,
            figures: vec![
                FigureSpec {
                    name: "vmm_overhead",
                    unit: "MiB",
                    peer_name: PEER_NAME,
                    target: Target::WispAtMost(2.0),
                    target_text: "<= 2 MiB (Firecracker: 1.9 MiB)",
                    note: "PSS of the VMM process (/proc/<pid>/smaps) minus the guest RAM's PSS, guest idle \
                           (`sleep 600`) after boot. One VMM runs at a time, so its binary's text counts whole; with \
                           a VMM per pod, PSS splits that shared text between them. Firecracker's 1.9 MiB is a \
                           published anchor measured the same way on this machine (TARGETS.md), not a peer of this \
                           run.",
                },
                FigureSpec {
                    name: "guest_ram_touched",
                    unit: "MiB",
                    peer_name: PEER_NAME,
                    target: Target::Report,
                    target_text: "report (lazy: << 128 MiB)",
                    note: "PSS of the 128 MiB guest RAM mapping after boot: what the guest touched, i.e. no \
                           pre-faulting.",
                },
            ],
        },
    ]
}

/// The timeline figure (from the idle_memory experiment's wisp runs).
pub fn boot_timeline_spec() -> FigureSpec {
    FigureSpec {
        name: "boot_timeline",
        unit: "ms",
        peer_name: "—",
        target: Target::Report,
        target_text: "report: the slowest phase",
        note: "",
    }
}

/// Figures whose components are not there yet: (figure, why not).
pub fn not_yet_measured() -> Vec<(FigureSpec, &'static str)> {
    let f = |name, unit, peer_name, target_text| FigureSpec {
        name,
        unit,
        peer_name,
        target: Target::Report,
        target_text,
        note: "",
    };
    vec![
        (
            f("boot_to_agent", "ms", "boot_to_userspace", "report; <= 1.2x boot_to_userspace"),
            "needs the static guest agent in target/guest/initrd.img and its vsock health check (in progress)",
        ),
        (f("ctr_run_echo", "ms", "runc", "<= 2.5x runc"), "needs the containerd shim (in progress)"),
        (
            f("cri_pod_lifecycle", "ms", "runc", "<= 2.5x runc"),
            "needs the containerd shim and a CRI client (in progress)",
        ),
        (
            f("pod_memory_pss", "MiB", "—", "<= 40 MiB (Kata ~124 MiB)"),
            "needs a pod started through the shim with the agent (in progress)",
        ),
        (f("shim_rss", "MiB", "—", "<= 10 MiB"), "needs the containerd shim (in progress)"),
        (
            f("parallel_start_10", "ms", "10x serial", "< 0.5x serial"),
            "needs pods started through the shim (in progress)",
        ),
        (f("net_throughput", "Gbit/s", "runc", "report"), "needs pod networking (in progress)"),
    ]
}

/// Spawn to the guest's first userspace line on the console. QEMU is killed once the
/// line is seen (it takes long to exit); wisp-vmm ends with the guest's reboot.
fn boot_to_userspace(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    let mut vm = TimedChild::spawn(side.name(), &mut ctx.setup.command(side, &[]))?;
    let at = vm.wait_for(USERSPACE_MARKER, ctx.boot_timeout)?;
    let ms = at.duration_since(vm.started).as_secs_f64() * 1e3;
    // Not part of the figure: wisp-vmm's own exit keeps a rebooting guest from
    // overlapping the next run; then both are made sure to be gone.
    if side == Side::Wisp {
        let _ = vm.wait_exit(EXIT_GRACE);
    }
    vm.stop()?;
    Ok(Sample { values: vec![("boot_to_userspace", ms)], ..Default::default() })
}

/// An idle guest's VMM memory, split into guest RAM and the VMM itself; for wisp-vmm
/// also the boot timeline (control API + log lines).
fn idle_memory(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    let dir = tempfile::tempdir()?;
    let api = dir.path().join("api.sock");
    let mut cmd = ctx.setup.command(side, &["sleep", "600"]);
    if side == Side::Wisp {
        cmd.arg("--api-sock").arg(&api).args(["--log-level", "info"]);
    }
    let mut vm = TimedChild::spawn(side.name(), &mut cmd)?;
    vm.wait_for(USERSPACE_MARKER, ctx.boot_timeout)?;
    std::thread::sleep(ctx.settle);
    let anchor = ctx.setup.ram_anchor(side);
    let mem = vmm_memory(vm.pid(), MEMORY_MIB << 20, anchor.as_ref().map(|(gpa, b)| Anchor { gpa: *gpa, bytes: b }))
        .with_context(|| format!("{} memory", side.name()))?;
    let timeline = match side {
        Side::Wisp => Some(wisp_timeline(&vm, &api).context("wisp-vmm boot timeline")?),
        Side::Peer => None,
    };
    vm.stop()?;
    let mib = |kib: u64| kib as f64 * 1024.0 / MIB;
    let parts = match side {
        Side::Wisp => mem
            .overhead_by_backing
            .iter()
            .map(|(label, kib)| Part { figure: "vmm_overhead", label: label.clone(), value: mib(*kib) })
            .collect(),
        Side::Peer => Vec::new(),
    };
    Ok(Sample {
        values: vec![("vmm_overhead", mib(mem.overhead_kib())), ("guest_ram_touched", mib(mem.guest_pss_kib))],
        timeline,
        parts,
    })
}

fn wisp_timeline(vm: &TimedChild, api: &std::path::Path) -> anyhow::Result<Timeline> {
    let client = VmmClient::new(
        ttrpc::Client::connect(&format!("unix://{}", api.display()))
            .with_context(|| format!("connecting to the control API {}", api.display()))?,
    );
    let tl =
        client.boot_timeline(ttrpc::context::with_timeout(10_000_000_000), &Empty::new()).context("BootTimeline")?;
    let milestones: Vec<(String, f64)> = tl.milestones.iter().map(|m| (m.name.clone(), m.at_us as f64 / 1e3)).collect();
    timeline::from_run(vm.started, &vm.lines(), &milestones, USERSPACE_MARKER)
}
