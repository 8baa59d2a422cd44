//! wisp-vmm end to end: real guest kernel boots (emulated KVM host or hardware KVM),
//! vCPUs, console, reboot, virtio-blk, virtio-vsock in both directions, the control
//! API, and clean exits. Run through `make e2e` (inside `tests/kvmhost/run`).

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use wisp_protocols::hybrid_vsock;
use wisp_tests::harness::{need_full_kvm, need_kvm, CaseResult, Outcome, Suite};
use wisp_tests::pattern::{first_mismatch, pattern};
use wisp_tests::process::Watched;
use wisp_tests::{artifact, ensure_that, skip_unless};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const MIB: u64 = 1 << 20;

fn vmm_bin() -> PathBuf {
    artifact("release/wisp-vmm")
}

fn need_artifacts() -> Option<String> {
    for p in [vmm_bin(), artifact("guest/vmlinux"), artifact("guest/test-initrd.img")] {
        if !p.exists() {
            return Some(format!("{} is missing: run `make build guest` first", p.display()));
        }
    }
    None
}

/// wisp-vmm with the test kernel and initrd; `guest_cmd` runs in the guest after boot.
fn vmm_cmd(guest_cmd: &str) -> Command {
    let mut c = Command::new(vmm_bin());
    c.arg("--kernel").arg(artifact("guest/vmlinux"));
    c.arg("--initrd").arg(artifact("guest/test-initrd.img"));
    c.args(["--console", "stdout", "--memory-mib", "256"]);
    if !guest_cmd.is_empty() {
        c.arg("--cmdline").arg(format!("-- /bin/sh -c \"{guest_cmd}\""));
    }
    c
}

fn expect_clean_exit(vm: &mut Watched) -> anyhow::Result<String> {
    let status = vm.wait_exit(BOOT_TIMEOUT)?;
    let out = vm.output();
    ensure_that!(status.success(), "wisp-vmm exited with {status}; output:\n{out}");
    Ok(out)
}

fn refuses_a_file_that_is_not_a_kernel() -> CaseResult {
    skip_unless!(need_artifacts());
    let dir = tempfile::tempdir()?;
    let bogus = dir.path().join("not-a-kernel");
    std::fs::write(&bogus, vec![0u8; 4096])?;
    let out = Command::new(vmm_bin()).arg("--kernel").arg(&bogus).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure_that!(!out.status.success(), "wisp-vmm accepted a bogus kernel");
    ensure_that!(err.contains("not-a-kernel"), "error does not name the file: {err}");
    ensure_that!(err.lines().count() == 1, "want a one-line reason, got: {err}");
    let out = Command::new(vmm_bin()).args(["--kernel", "/nonexistent/vmlinux", "--vcpus", "0"]).output()?;
    ensure_that!(!out.status.success(), "wisp-vmm accepted vcpus 0");
    Ok(Outcome::Passed)
}

fn boots_to_userspace_and_reboot_exits_0() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    let mut vm = Watched::spawn("wisp-vmm", &mut vmm_cmd("echo WISP-MARKER-$((6*7))"))?;
    let out = expect_clean_exit(&mut vm)?;
    ensure_that!(out.contains("WISP-TEST-INIT-STARTED"), "guest userspace never started:\n{out}");
    ensure_that!(out.contains("WISP-MARKER-42"), "guest command did not run:\n{out}");
    Ok(Outcome::Passed)
}

fn two_vcpus_are_online() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    let mut c = vmm_cmd("echo CPUS=$(grep -c ^processor /proc/cpuinfo)");
    c.args(["--vcpus", "2"]);
    let mut vm = Watched::spawn("wisp-vmm", &mut c)?;
    let out = expect_clean_exit(&mut vm)?;
    ensure_that!(out.contains("CPUS=2"), "guest does not see 2 CPUs:\n{out}");
    Ok(Outcome::Passed)
}

fn sha256(data: &[u8]) -> anyhow::Result<String> {
    let mut child = Command::new("sha256sum").stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn()?;
    child.stdin.take().context("stdin")?.write_all(data)?;
    let out = child.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string())
}

fn disk_image(dir: &Path, size: u64) -> anyhow::Result<(PathBuf, Vec<u8>)> {
    let mut data = vec![0u8; size as usize];
    pattern(&mut data, 0);
    let path = dir.join("disk.img");
    std::fs::write(&path, &data)?;
    Ok((path, data))
}

fn virtio_blk_reads_and_writes() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    let dir = tempfile::tempdir()?;
    let (img, data) = disk_image(dir.path(), 8 * MIB)?;
    let want = sha256(&data[..MIB as usize])?;
    let guest = "dd if=/dev/vda bs=65536 count=16 2>/dev/null | sha256sum; \
                 echo SECTORS=$(cat /sys/block/vda/size); \
                 echo wisp-was-here | dd of=/dev/vda bs=512 seek=4096 conv=fsync 2>/dev/null; echo WROTE=$?";
    let mut c = vmm_cmd(guest);
    c.arg("--disk").arg(&img);
    let mut vm = Watched::spawn("wisp-vmm", &mut c)?;
    let out = expect_clean_exit(&mut vm)?;
    ensure_that!(out.contains(&want), "guest read different data (want sha256 {want}):\n{out}");
    ensure_that!(out.contains(&format!("SECTORS={}", 8 * MIB / 512)), "wrong capacity:\n{out}");
    ensure_that!(out.contains("WROTE=0"), "guest write failed:\n{out}");
    let after = std::fs::read(&img)?;
    ensure_that!(&after[4096 * 512..4096 * 512 + 14] == b"wisp-was-here\n", "write did not reach the image file");
    ensure_that!(after[..4096 * 512] == data[..4096 * 512], "bytes outside the write changed");
    Ok(Outcome::Passed)
}

fn virtio_blk_read_only_refuses_writes() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    let dir = tempfile::tempdir()?;
    let (img, data) = disk_image(dir.path(), MIB)?;
    let guest = "echo RO=$(cat /sys/block/vda/ro); echo x | dd of=/dev/vda bs=512 conv=fsync 2>/dev/null; echo WROTE=$?";
    let mut c = vmm_cmd(guest);
    c.arg("--disk").arg(format!("{},ro", img.display()));
    let mut vm = Watched::spawn("wisp-vmm", &mut c)?;
    let out = expect_clean_exit(&mut vm)?;
    ensure_that!(out.contains("RO=1"), "guest does not see a read-only disk:\n{out}");
    ensure_that!(!out.contains("WROTE=0"), "guest could write a read-only disk:\n{out}");
    ensure_that!(std::fs::read(&img)? == data, "read-only image changed");
    Ok(Outcome::Passed)
}

const TRANSFER: u64 = 64 * MIB;

fn vsock_host_to_guest_64mib_echo() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    let dir = tempfile::tempdir()?;
    let uds = dir.path().join("vsock.sock");
    let mut c = vmm_cmd(&format!("vsock-probe echo 5000 {TRANSFER}"));
    c.arg("--vsock-uds").arg(&uds);
    let mut vm = Watched::spawn("wisp-vmm", &mut c)?;
    vm.wait_for("listening on port 5000", BOOT_TIMEOUT)?;
    let conn = hybrid_vsock::dial(&uds, 5000, Duration::from_secs(2), Duration::from_secs(60))?;
    let mut writer = conn.try_clone()?;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut off = 0u64;
        while off < TRANSFER {
            pattern(&mut buf, off);
            writer.write_all(&buf)?;
            off += buf.len() as u64;
        }
        Ok(())
    });
    let mut reader = conn;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < TRANSFER {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(bad) = first_mismatch(&buf[..n], got) {
            bail!("echoed byte {bad} differs from what was sent");
        }
        got += n as u64;
    }
    sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))??;
    ensure_that!(got == TRANSFER, "got {got} bytes back, sent {TRANSFER}");
    reader.write_all(b"A")?;
    let out = expect_clean_exit(&mut vm)?;
    ensure_that!(out.contains(&format!("echoed {TRANSFER} bytes, ack received")), "guest did not see all bytes:\n{out}");
    Ok(Outcome::Passed)
}

fn vsock_guest_to_host_64mib() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    let dir = tempfile::tempdir()?;
    let uds = dir.path().join("vsock.sock");
    let listener = UnixListener::bind(format!("{}_5001", uds.display()))?;
    let mut c = vmm_cmd(&format!("vsock-probe send 2 5001 {TRANSFER}"));
    c.arg("--vsock-uds").arg(&uds);
    let mut vm = Watched::spawn("wisp-vmm", &mut c)?;
    listener.set_nonblocking(false)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = (|| -> anyhow::Result<u64> {
            let (mut s, _) = listener.accept()?;
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                if let Some(bad) = first_mismatch(&buf[..n], got) {
                    bail!("byte {bad} from the guest differs from the pattern");
                }
                got += n as u64;
            }
            s.write_all(format!("OK {got}\n").as_bytes())?;
            Ok(got)
        })();
        let _ = tx.send(r);
    });
    let got = rx.recv_timeout(BOOT_TIMEOUT).context("the guest never connected or never finished sending")??;
    ensure_that!(got == TRANSFER, "host received {got} bytes, guest sent {TRANSFER}");
    let out = expect_clean_exit(&mut vm)?;
    ensure_that!(out.contains(&format!("OK {TRANSFER}")), "guest did not get the host's reply:\n{out}");
    Ok(Outcome::Passed)
}

fn vsock_to_a_port_nobody_listens_on_is_refused() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    let dir = tempfile::tempdir()?;
    let uds = dir.path().join("vsock.sock");
    let mut c = vmm_cmd("vsock-probe echo 5000 4");
    c.arg("--vsock-uds").arg(&uds);
    let mut vm = Watched::spawn("wisp-vmm", &mut c)?;
    vm.wait_for("listening on port 5000", BOOT_TIMEOUT)?;
    match hybrid_vsock::connect(&uds, 4999, Duration::from_secs(10)) {
        Err(hybrid_vsock::DialError::Refused { .. }) | Err(hybrid_vsock::DialError::Handshake { .. }) => {}
        Ok(_) => bail!("CONNECT to a port without a listener succeeded"),
        Err(e) => bail!("unexpected error: {e}"),
    }
    // The device still works afterwards; closing the echo connection ends the guest.
    let mut s = hybrid_vsock::dial(&uds, 5000, Duration::from_secs(2), Duration::from_secs(30))?;
    s.write_all(b"ping")?;
    let mut back = [0u8; 4];
    s.read_exact(&mut back)?;
    ensure_that!(&back == b"ping", "echo returned {back:?}");
    s.write_all(b"A")?;
    expect_clean_exit(&mut vm)?;
    Ok(Outcome::Passed)
}

fn control_api_pause_resume_timeline_shutdown() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    use wisp_protocols::vmm::{Empty, ShutdownRequest};
    use wisp_protocols::vmm_ttrpc::VmmClient;
    let dir = tempfile::tempdir()?;
    let api = dir.path().join("api.sock");
    let uds = dir.path().join("vsock.sock");
    let mut c = vmm_cmd("sleep 600");
    c.arg("--api-sock").arg(&api).arg("--vsock-uds").arg(&uds);
    let mut vm = Watched::spawn("wisp-vmm", &mut c)?;
    vm.wait_for("WISP-TEST-INIT-STARTED", BOOT_TIMEOUT)?;
    let client = VmmClient::new(ttrpc::Client::connect(&format!("unix://{}", api.display()))?);
    let ctx = || ttrpc::context::with_timeout(10_000_000_000);
    let st = client.state(ctx(), &Empty::new())?;
    ensure_that!(st.state == "running" && st.vcpus == 1 && st.memory_bytes == 256 * MIB, "state {st:?}");
    client.pause(ctx(), &Empty::new())?;
    ensure_that!(client.state(ctx(), &Empty::new())?.state == "paused", "not paused");
    client.resume(ctx(), &Empty::new())?;
    ensure_that!(client.state(ctx(), &Empty::new())?.state == "running", "not running after resume");
    let tl = client.boot_timeline(ctx(), &Empty::new())?;
    let names: Vec<&str> = tl.milestones.iter().map(|m| m.name.as_str()).collect();
    for want in ["process_start", "kvm_ready", "kernel_loaded", "vcpus_started"] {
        ensure_that!(names.contains(&want), "timeline lacks {want}: {names:?}");
    }
    ensure_that!(tl.milestones.windows(2).all(|w| w[0].at_us <= w[1].at_us), "timeline not ordered");
    client.shutdown(ctx(), &ShutdownRequest { grace_ms: 200, ..Default::default() })?;
    let status = vm.wait_exit(Duration::from_secs(30))?;
    ensure_that!(status.success(), "wisp-vmm exited with {status} after Shutdown");
    ensure_that!(!api.exists() && !uds.exists(), "sockets left behind after shutdown");
    Ok(Outcome::Passed)
}

fn sigterm_ends_the_vm_and_removes_sockets() -> CaseResult {
    skip_unless!(need_artifacts(), need_kvm());
    let dir = tempfile::tempdir()?;
    let api = dir.path().join("api.sock");
    let uds = dir.path().join("vsock.sock");
    let mut c = vmm_cmd("sleep 600");
    c.arg("--api-sock").arg(&api).arg("--vsock-uds").arg(&uds);
    let mut vm = Watched::spawn("wisp-vmm", &mut c)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !api.exists() {
        ensure_that!(std::time::Instant::now() < deadline, "API socket never appeared:\n{}", vm.output());
        std::thread::sleep(Duration::from_millis(20));
    }
    vm.signal(libc::SIGTERM);
    let status = vm.wait_exit(Duration::from_secs(30))?;
    ensure_that!(status.success(), "wisp-vmm exited with {status} on SIGTERM:\n{}", vm.output());
    ensure_that!(!api.exists() && !uds.exists(), "sockets left behind after SIGTERM");
    Ok(Outcome::Passed)
}

fn main() {
    Suite::new("vmm_boot")
        .case("refuses_a_file_that_is_not_a_kernel", refuses_a_file_that_is_not_a_kernel)
        .case("sigterm_ends_the_vm_and_removes_sockets", sigterm_ends_the_vm_and_removes_sockets)
        .case("boots_to_userspace_and_reboot_exits_0", boots_to_userspace_and_reboot_exits_0)
        .case("two_vcpus_are_online", two_vcpus_are_online)
        .case("virtio_blk_reads_and_writes", virtio_blk_reads_and_writes)
        .case("virtio_blk_read_only_refuses_writes", virtio_blk_read_only_refuses_writes)
        .case("vsock_host_to_guest_64mib_echo", vsock_host_to_guest_64mib_echo)
        .case("vsock_guest_to_host_64mib", vsock_guest_to_host_64mib)
        .case("vsock_to_a_port_nobody_listens_on_is_refused", vsock_to_a_port_nobody_listens_on_is_refused)
        .case("control_api_pause_resume_timeline_shutdown", control_api_pause_resume_timeline_shutdown)
        .run()
}
