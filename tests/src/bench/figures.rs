//! The figures of `make bench`: the experiments that measure them and the figures
//! that wait for components still being built (listed with the reason).

use std::time::Duration;

use anyhow::Context;
use wisp_protocols::vmm::Empty;
use wisp_protocols::vmm_ttrpc::VmmClient;

use super::pods::{
    cri_pod_lifecycle, ctr_run_echo, ctr_run_echo_confinement, ctr_run_echo_template, idle_pod_memory, net_throughput,
    parallel_start, template_pods_memory,
};
use super::smaps::{vmm_memory, Anchor};
use super::timed::TimedChild;
use super::timeline::{self, Point, Timeline};
use super::vms::{Side, MEMORY_MIB, PEER_NAME, USERSPACE_MARKER};
use super::{Ctx, Experiment, FigureSpec, Part, Sample, Target};

const MIB: f64 = 1024.0 * 1024.0;
/// How long a wisp-vmm gets to end by itself after its guest rebooted.
const EXIT_GRACE: Duration = Duration::from_secs(60);

pub fn experiments() -> Vec<Experiment> {
    vec![
        Experiment {
            name: "boot",
            sides: ("wisp-vmm", PEER_NAME),
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
            name: "boot_agent",
            sides: ("wisp-vmm + agent", "wisp-vmm + test init"),
            run: boot_to_agent,
            figures: vec![FigureSpec {
                name: "boot_to_agent",
                unit: "ms",
                peer_name: "boot_to_userspace (wisp)",
                target: Target::RatioAtMost(1.2),
                target_text: "report; <= 1.2x boot_to_userspace",
                note: "VMM spawn until the agent (the product initrd's /init) answers a ttrpc Check over hybrid \
                       vsock, against wisp-vmm's own boot to the test initrd's first line in the same runs; both \
                       1 vCPU, 128 MiB, console on. Its wisp runs also give the boot timeline.",
            }],
        },
        Experiment {
            name: "restore",
            sides: ("wisp-vmm --restore", "wisp-vmm cold boot"),
            run: super::restore::restore_to_agent,
            figures: vec![FigureSpec {
                name: "restore_to_agent",
                unit: "ms",
                peer_name: "boot_to_agent (the same VMM booting cold)",
                target: Target::RatioAtMost(0.2),
                target_text: "<= 0.2x cold boot",
                note: "VMM spawn until the agent answers a ttrpc Check over hybrid vsock, the VMM started from a \
                       snapshot (`--restore`: a VM booted once to its agent, paused and snapshotted through the \
                       control API, its memory file mapped copy-on-write) against the same VMM booting cold to the \
                       same answer; both 1 vCPU, 128 MiB, console on. VMM level (the shim's templates: \
                       ctr_run_echo_template).",
            }],
        },
        Experiment {
            name: "restore_memory",
            sides: ("10 restored", "10 cold-booted"),
            run: super::restore::restored_vms_memory,
            figures: vec![FigureSpec {
                name: "vm_memory_pss_10",
                unit: "MiB",
                peer_name: "10 cold-booted",
                target: Target::RatioAtMost(0.6),
                target_text: "<= 0.6x cold, and <= 25 MiB per VM",
                note: "10 VMMs at once, each started to its agent's answer (restored from the same snapshot, or \
                       booted cold), idle for the settle time: the PSS (smaps_rollup) of the 10 VMM processes, per \
                       VM. Guest pages restored VMs only read are one page-cache copy that PSS splits between \
                       them. VMM level: no shim or containerd.",
            }],
        },
        Experiment {
            name: "idle_memory",
            sides: ("wisp-vmm", PEER_NAME),
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
        Experiment {
            name: "shared_fs",
            sides: ("guest on virtio-fs", "host"),
            run: shared_fs_throughput,
            figures: vec![
                FigureSpec {
                    name: "fs_write_256mib",
                    unit: "MB/s",
                    peer_name: "host, same filesystem",
                    target: Target::Report,
                    target_text: "report (higher is better)",
                    note: "`dd if=/dev/zero bs=1M count=256 conv=fsync` in the guest onto a virtio-fs share \
                           (cache=auto, 1 MiB read-ahead as the agent sets it), against the same dd on the host \
                           into the same kind of directory.",
                },
                FigureSpec {
                    name: "fs_read_256mib",
                    unit: "MB/s",
                    peer_name: "host, same filesystem",
                    target: Target::Report,
                    target_text: "report (higher is better)",
                    note: "Cold sequential read (caches dropped on that side) of the same file with dd bs=1M.",
                },
            ],
        },
        Experiment {
            name: "ctr_run",
            sides: ("wisp", "runc"),
            run: ctr_run_echo,
            figures: vec![FigureSpec {
                name: "ctr_run_echo",
                unit: "ms",
                peer_name: "runc",
                target: Target::RatioAtMost(1.3),
                target_text: "<= 1.3x runc",
                note: "Wall time of `ctr run --rm --runtime <wisp|runc> <busybox> <id> echo` against one \
                       containerd 1.6 (overlayfs snapshots); wisp starts a 256 MiB, 1 vCPU VM per run, restored \
                       from the VM template (the default; the first run makes it).",
            }],
        },
        Experiment {
            name: "ctr_run_template",
            sides: ("wisp, templates", "wisp, cold boot"),
            run: ctr_run_echo_template,
            figures: vec![FigureSpec {
                name: "ctr_run_echo_template",
                unit: "ms",
                peer_name: "wisp with hypervisor.templates off",
                target: Target::Report,
                target_text: "report: what templates save per pod",
                note: "Wall time of `ctr run --rm --runtime wisp <busybox> <id> echo` with the default configuration \
                       (the pod's VM restored from its shape's template) against the same with templates off \
                       (`--runtime-config-path`: a cold boot), in the same containerd.",
            }],
        },
        Experiment {
            name: "template_memory",
            sides: ("10 restored pods", "10 cold-booted pods"),
            run: template_pods_memory,
            figures: vec![FigureSpec {
                name: "pod_memory_pss_10",
                unit: "MiB",
                peer_name: "10 cold-booted pods",
                target: Target::RatioAtMost(0.6),
                target_text: "<= 0.6x cold, and <= 25 MiB per pod",
                note: "10 idle wisp pods at once (`ctr run -d ... sleep 600`, 256 MiB VMs), restored from the \
                       template or booted cold (templates off), after the settle time: the PSS (smaps_rollup) of \
                       their shims and VMMs, per pod. Guest pages a restored pod only read are one page-cache copy \
                       of the template's memory file that PSS splits between the VMMs.",
            }],
        },
        Experiment {
            name: "confinement_boot",
            sides: ("wisp-vmm jailed", "wisp-vmm unconfined"),
            run: boot_to_agent_confinement,
            figures: vec![FigureSpec {
                name: "boot_to_agent_confined",
                unit: "ms",
                peer_name: "the same wisp-vmm without jail and seccomp",
                target: Target::Report,
                target_text: "report: the boot cost of the jail and seccomp filters",
                note: "Spawn to the agent's ttrpc answer, as boot_to_agent, with wisp-vmm started as the shim \
                       starts it (PID 1 of a new PID namespace, --jail, per-thread seccomp) against the same \
                       VMM with --no-seccomp and no jail.",
            }],
        },
        Experiment {
            name: "confinement",
            sides: ("wisp", "wisp unconfined"),
            run: ctr_run_echo_confinement,
            figures: vec![FigureSpec {
                name: "ctr_run_echo_confined",
                unit: "ms",
                peer_name: "wisp with hypervisor.jail and hypervisor.seccomp off",
                target: Target::Report,
                target_text: "report: the cost of the VMM's jail and seccomp filters",
                note: "Wall time of `ctr run --rm --runtime wisp <busybox> <id> echo` with wisp's defaults \
                       (jailed VMM: namespaces, pivot_root, capabilities, per-thread seccomp) against the same \
                       with jail and seccomp off (`--runtime-config-path`), in the same containerd.",
            }],
        },
        Experiment {
            name: "cri_lifecycle",
            sides: ("wisp", "runc"),
            run: cri_pod_lifecycle,
            figures: vec![FigureSpec {
                name: "cri_pod_lifecycle",
                unit: "ms",
                peer_name: "runc",
                target: Target::RatioAtMost(1.3),
                target_text: "<= 1.3x runc",
                note: "RunPodSandbox, CreateContainer + StartContainer (`sleep 600`), StopPodSandbox, \
                       RemovePodSandbox through containerd's CRI plugin, runtime handler `wisp` or `runc`; \
                       host-network pods (no CNI) so only the runtime differs; wisp's VMs restored from the \
                       template (the default).",
            }],
        },
        Experiment {
            name: "idle_pod",
            sides: ("wisp", "runc"),
            run: idle_pod_memory,
            figures: vec![
                FigureSpec {
                    name: "pod_memory_pss",
                    unit: "MiB",
                    peer_name: "runc",
                    target: Target::WispAtMost(40.0),
                    target_text: "<= 40 MiB (Kata ~124 MiB)",
                    note: "`ctr run -d ... sleep 600`, after the settle time: PSS (smaps_rollup) of the shim plus \
                           the VMM including the guest RAM the guest touched (wisp, 256 MiB VM), or of the shim \
                           plus the container's process (runc).",
                },
                FigureSpec {
                    name: "shim_rss",
                    unit: "MiB",
                    peer_name: "runc",
                    target: Target::WispAtMost(10.0),
                    target_text: "<= 10 MiB",
                    note: "RSS of the pod's shim process in the same runs.",
                },
            ],
        },
        Experiment {
            name: "parallel_start",
            sides: ("10 at once", "10 one by one"),
            run: parallel_start,
            figures: vec![FigureSpec {
                name: "parallel_start_10",
                unit: "ms",
                peer_name: "10x serial",
                target: Target::RatioAtMost(0.5),
                target_text: "< 0.5x serial",
                note: "Wall time until all of 10 `ctr run -d` wisp pods run, started concurrently, against the \
                       same 10 started one after another.",
            }],
        },
        // Last: sustained nested TCP was what most often killed the emulated KVM host
        // before its QEMU race was fixed (issue 17), and a dead host ends the run (what
        // was measured before stays in the report).
        Experiment {
            name: "net",
            sides: ("wisp <-> wisp", "runc <-> runc"),
            run: net_throughput,
            figures: vec![FigureSpec {
                name: "net_throughput",
                unit: "Mbit/s",
                peer_name: "runc",
                target: Target::Report,
                target_text: "report (higher is better)",
                note: "Pod-to-pod TCP on the CNI bridge plugin: 64 MiB through busybox `nc`, timed by the sender's \
                       own clock; two wisp pods (veth -> tc mirred -> tap -> virtio-net on each side) against two \
                       runc pods on the same bridge.",
            }],
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
    // Every figure of TARGETS.md has an experiment now; a figure whose component is
    // missing is listed here with the reason instead of a number.
    Vec::new()
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

/// An idle guest's VMM memory, split into guest RAM and the VMM itself.
fn idle_memory(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    let mut vm = TimedChild::spawn(side.name(), &mut ctx.setup.command(side, &["sleep", "600"]))?;
    vm.wait_for(USERSPACE_MARKER, ctx.boot_timeout)?;
    std::thread::sleep(ctx.settle);
    let anchor = ctx.setup.ram_anchor(side);
    let mem = vmm_memory(vm.pid(), MEMORY_MIB << 20, anchor.as_ref().map(|(gpa, b)| Anchor { gpa: *gpa, bytes: b }))
        .with_context(|| format!("{} memory", side.name()))?;
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
        parts,
        ..Default::default()
    })
}

/// What the agent prints on the console once it listens.
pub const AGENT_MARKER: &str = "listening: api";

/// wisp side: spawn to the agent answering Check, plus the boot timeline; peer side:
/// wisp-vmm's boot to the test initrd's marker (the reference the target is set by).
fn boot_to_agent(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    if side == Side::Peer {
        let mut s = boot_to_userspace(ctx, Side::Wisp)?;
        s.values = s.values.into_iter().map(|(_, v)| ("boot_to_agent", v)).collect();
        return Ok(s);
    }
    let dir = tempfile::tempdir()?;
    let (vsock, api) = (dir.path().join("vsock"), dir.path().join("api.sock"));
    let mut vm = TimedChild::spawn("wisp-vmm + agent", &mut ctx.setup.wisp_with_agent(&vsock, &api))?;
    let answered = check_agent(&vm, &vsock, ctx.boot_timeout)?;
    let ms = answered.duration_since(vm.started).as_secs_f64() * 1e3;
    let mut tl = wisp_timeline(&vm, &api, AGENT_MARKER).context("wisp-vmm boot timeline")?;
    tl.points.push(Point { name: timeline::AGENT_ANSWERED.into(), at_ms: ms });
    tl.points.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
    vm.stop()?;
    Ok(Sample { values: vec![("boot_to_agent", ms)], timeline: Some(tl), ..Default::default() })
}

/// The cost of the jail and seccomp at boot: wisp-vmm to the agent's answer, started as
/// the shim starts it (PID 1 of a new PID namespace through `unshare`, `--jail`, seccomp
/// on: its default) against the same VMM unconfined (`--no-seccomp`, no jail).
fn boot_to_agent_confinement(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    let dir = tempfile::tempdir()?;
    let (run, jail) = (dir.path().join("run"), dir.path().join("jail"));
    std::fs::create_dir(&run)?;
    std::fs::create_dir(&jail)?;
    let (vsock, api) = (run.join("vsock"), run.join("api.sock"));
    let plain = ctx.setup.wisp_with_agent(&vsock, &api);
    let mut cmd = if side == Side::Wisp {
        let mut c = std::process::Command::new("unshare");
        c.args(["--pid", "--fork", "--kill-child"]).arg(plain.get_program()).args(plain.get_args());
        c.arg("--jail").arg(&jail);
        c
    } else {
        let mut c = plain;
        c.arg("--no-seccomp");
        c
    };
    let mut vm = TimedChild::spawn("wisp-vmm + agent", &mut cmd)?;
    let answered = check_agent(&vm, &vsock, ctx.boot_timeout)?;
    let ms = answered.duration_since(vm.started).as_secs_f64() * 1e3;
    vm.stop()?;
    Ok(Sample { values: vec![("boot_to_agent_confined", ms)], ..Default::default() })
}

/// Dials the agent as the shim does (`wisp_shim::agent::Agent::connect`: hybrid vsock,
/// retried until a version Check answers); returns when it did.
pub(super) fn check_agent(
    vm: &TimedChild,
    vsock: &std::path::Path,
    timeout: Duration,
) -> anyhow::Result<std::time::Instant> {
    let attempt = Duration::from_secs(2);
    match wisp_shim::agent::Agent::connect(vsock, attempt, timeout, attempt, &|| None) {
        Ok(_) => Ok(std::time::Instant::now()),
        Err(e) => anyhow::bail!("{e}; VMM output:\n{}", vm.transcript()),
    }
}

fn wisp_timeline(vm: &TimedChild, api: &std::path::Path, marker: &str) -> anyhow::Result<Timeline> {
    let client = VmmClient::new(
        ttrpc::Client::connect(&format!("unix://{}", api.display()))
            .with_context(|| format!("connecting to the control API {}", api.display()))?,
    );
    let tl =
        client.boot_timeline(ttrpc::context::with_timeout(10_000_000_000), &Empty::new()).context("BootTimeline")?;
    let milestones: Vec<(String, f64)> = tl.milestones.iter().map(|m| (m.name.clone(), m.at_us as f64 / 1e3)).collect();
    timeline::from_run(vm.started, &vm.lines(), &milestones, marker)
}

/// Size of the file the shared-filesystem figures write and read.
const FS_FILE_MIB: u64 = 256;

/// Sequential dd of a 256 MiB file: wisp side inside the guest on a virtio-fs share
/// (cache=auto, read-ahead raised as the agent does), peer side on the host in the same
/// kind of directory; MB/s for the write (with fsync) and a cold read.
fn shared_fs_throughput(ctx: &Ctx, side: Side) -> anyhow::Result<Sample> {
    let dir = tempfile::tempdir()?;
    let (write_s, read_s) = match side {
        Side::Wisp => {
            let guest = format!(
                "mkdir -p /mnt && mount -t virtiofs bench /mnt && \
                 set -- $(grep ' /mnt ' /proc/self/mountinfo) && echo {ra} > /sys/class/bdi/$3/read_ahead_kb && \
                 echo FS-W-BEGIN && dd if=/dev/zero of=/mnt/f bs=1M count={FS_FILE_MIB} conv=fsync 2>/dev/null && \
                 echo FS-W-END && echo 3 > /proc/sys/vm/drop_caches && \
                 echo FS-R-BEGIN && dd if=/mnt/f of=/dev/null bs=1M 2>/dev/null && echo FS-R-END",
                ra = wisp_agent::guest::SHARED_FS_READ_AHEAD_KB,
            );
            let s = &ctx.setup;
            let mut cmd = std::process::Command::new(&s.vmm);
            cmd.arg("--kernel").arg(&s.kernel).arg("--initrd").arg(&s.initrd);
            // Room for the file in the guest's page cache; lazily backed.
            cmd.args(["--console", "stdout", "--vcpus", "1", "--memory-mib", "768"]);
            cmd.arg("--cmdline").arg(format!("-- /bin/sh -c \"{guest}\""));
            cmd.arg("--shared-dir").arg(format!("bench={}", dir.path().display()));
            let mut vm = TimedChild::spawn("wisp-vmm + virtio-fs", &mut cmd)?;
            let phase = |name: &str| -> anyhow::Result<f64> {
                // The markers are in the echoed kernel command line too: whole lines only.
                let begin = vm.wait_for_line(&format!("FS-{name}-BEGIN"), ctx.boot_timeout)?;
                let end = vm.wait_for_line(&format!("FS-{name}-END"), ctx.boot_timeout)?;
                Ok(end.duration_since(begin).as_secs_f64())
            };
            let w = phase("W");
            let r = w.as_ref().ok().map(|_| phase("R"));
            let _ = vm.wait_exit(EXIT_GRACE);
            vm.stop()?;
            let len = std::fs::metadata(dir.path().join("f")).map(|m| m.len()).unwrap_or(0);
            anyhow::ensure!(len == FS_FILE_MIB << 20, "the guest wrote {len} bytes to the share");
            (w?, r.context("no read phase")??)
        }
        Side::Peer => {
            let f = dir.path().join("f");
            let run = |script: String| -> anyhow::Result<f64> {
                let t = std::time::Instant::now();
                let st = std::process::Command::new("sh").arg("-c").arg(&script).status()?;
                anyhow::ensure!(st.success(), "`{script}` failed");
                Ok(t.elapsed().as_secs_f64())
            };
            let w =
                run(format!("dd if=/dev/zero of={} bs=1M count={FS_FILE_MIB} conv=fsync 2>/dev/null", f.display()))?;
            run("sync; echo 3 > /proc/sys/vm/drop_caches".into())?;
            let r = run(format!("dd if={} of=/dev/null bs=1M 2>/dev/null", f.display()))?;
            (w, r)
        }
    };
    let mbps = |secs: f64| (FS_FILE_MIB << 20) as f64 / 1e6 / secs.max(1e-6);
    Ok(Sample {
        values: vec![("fs_write_256mib", mbps(write_s)), ("fs_read_256mib", mbps(read_s))],
        ..Default::default()
    })
}
