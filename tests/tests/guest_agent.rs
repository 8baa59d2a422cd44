//! wisp-agent as PID 1 in a real guest (emulated KVM host): it leaves the initramfs,
//! mounts what containers need, answers the health check over hybrid vsock, reports
//! the guest, and DestroySandbox ends the VM cleanly.

use std::os::fd::IntoRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use wisp_protocols::agent::{CheckRequest, Empty};
use wisp_protocols::agent_ttrpc::AgentClient;
use wisp_protocols::{hybrid_vsock, AGENT_API_VERSION, AGENT_TTRPC_PORT};
use wisp_tests::harness::{need_full_kvm, CaseResult, Outcome, Suite};
use wisp_tests::process::Watched;
use wisp_tests::{artifact, ensure_that, need_built, skip_unless};

fn need_artifacts() -> Option<String> {
    need_built(&["release/wisp-vmm", "guest/vmlinux", "guest/initrd.img"])
}

fn boot(dir: &std::path::Path) -> anyhow::Result<(Watched, PathBuf)> {
    let uds = dir.join("vsock.sock");
    let mut c = Command::new(artifact("release/wisp-vmm"));
    c.arg("--kernel").arg(artifact("guest/vmlinux")).arg("--initrd").arg(artifact("guest/initrd.img"));
    c.args(["--memory-mib", "256", "--console", "stdout", "--log-level", "info"]).arg("--vsock-uds").arg(&uds);
    Ok((Watched::spawn("wisp-vmm", &mut c)?, uds))
}

fn agent_answers_and_destroy_ends_the_vm() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    let dir = tempfile::tempdir()?;
    let (mut vm, uds) = boot(dir.path())?;
    let stream = hybrid_vsock::dial(&uds, AGENT_TTRPC_PORT, Duration::from_secs(2), Duration::from_secs(120))
        .map_err(|e| anyhow::anyhow!("{e}; VMM output:\n{}", vm.output()))?;
    let client = AgentClient::new(ttrpc::Client::new(stream.into_raw_fd())?);
    let ctx = || ttrpc::context::with_timeout(20_000_000_000);
    let check = client.check(ctx(), &CheckRequest { api_version: AGENT_API_VERSION, ..Default::default() })?;
    ensure_that!(check.api_version == AGENT_API_VERSION && !check.agent_version.is_empty(), "check: {check:?}");
    let d = client.guest_details(ctx(), &Empty::new())?;
    ensure_that!(d.kernel_release.starts_with("6.12"), "guest kernel {:?}", d.kernel_release);
    ensure_that!(d.cpus == 1 && d.mem_total_bytes > 128 << 20, "guest details {d:?}");
    for want in ["cpu", "memory", "pids"] {
        ensure_that!(
            d.cgroup_controllers.iter().any(|c| c == want),
            "cgroup controller {want} missing: {:?}",
            d.cgroup_controllers
        );
    }
    println!(
        "agent {} rss {} KiB, guest {} MiB",
        check.agent_version,
        d.agent_rss_bytes / 1024,
        d.mem_total_bytes >> 20
    );
    client.destroy_sandbox(ctx(), &Empty::new())?;
    let status = vm.wait_exit(Duration::from_secs(60))?;
    ensure_that!(status.success(), "VMM exited with {status} after DestroySandbox; output:\n{}", vm.output());
    Ok(Outcome::Passed)
}

/// The agent does not judge the version it is sent: it answers with its own, and the
/// shim refuses an agent of another version (that refusal is unit-tested in the shim,
/// `agent::tests::an_agent_of_another_api_version_is_refused`, against a fake agent).
/// What is checked here is the agent's half: its own version back, and still serving.
fn the_agent_answers_a_foreign_api_version_with_its_own() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    let dir = tempfile::tempdir()?;
    let (_vm, uds) = boot(dir.path())?;
    let stream = hybrid_vsock::dial(&uds, AGENT_TTRPC_PORT, Duration::from_secs(2), Duration::from_secs(120))?;
    let client = AgentClient::new(ttrpc::Client::new(stream.into_raw_fd())?);
    let ctx = || ttrpc::context::with_timeout(20_000_000_000);
    let r = client.check(ctx(), &CheckRequest { api_version: AGENT_API_VERSION + 99, ..Default::default() })?;
    ensure_that!(r.api_version == AGENT_API_VERSION, "agent claims version {}, is {AGENT_API_VERSION}", r.api_version);
    let again = client.check(ctx(), &CheckRequest { api_version: AGENT_API_VERSION, ..Default::default() })?;
    ensure_that!(again.api_version == AGENT_API_VERSION, "agent did not survive");
    Ok(Outcome::Passed)
}

fn main() {
    Suite::new("guest_agent")
        .case("agent_answers_and_destroy_ends_the_vm", agent_answers_and_destroy_ends_the_vm)
        .case(
            "the_agent_answers_a_foreign_api_version_with_its_own",
            the_agent_answers_a_foreign_api_version_with_its_own,
        )
        .run()
}
