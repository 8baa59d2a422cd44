//! wisp-vmm end to end: real guest kernel boots (emulated KVM host or hardware KVM),
//! vCPUs, console, reboot, virtio-blk, virtio-vsock in both directions, virtio-fs
//! (sharing both ways, host changes, read-only, confinement to the share, 256 MiB files,
//! dd throughput per cache mode), virtio-net over a host tap (ping, TCP both ways, by
//! name and as an inherited descriptor), the control API, and clean exits. Run through
//! `make e2e` (inside `tests/kvmhost/run`).

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use wisp_protocols::hybrid_vsock;
use wisp_tests::harness::{need_full_kvm, need_kvm, need_root, CaseResult, Outcome, Suite};
use wisp_tests::pattern::{first_mismatch, pattern};
use wisp_tests::process::Watched;
use wisp_tests::{artifact, ensure_that, need_built, skip_unless};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const MIB: u64 = 1 << 20;

fn vmm_bin() -> PathBuf {
    artifact("release/wisp-vmm")
}

fn need_artifacts() -> Option<String> {
    need_built(&["release/wisp-vmm", "guest/vmlinux", "guest/test-initrd.img"])
}

/// wisp-vmm with the test kernel and initrd; `guest_cmd` runs in the guest after boot.
fn vmm_cmd(guest_cmd: &str) -> Command {
    vmm_cmd_with_memory(guest_cmd, 256)
}

fn vmm_cmd_with_memory(guest_cmd: &str, mib: u32) -> Command {
    let mut c = Command::new(vmm_bin());
    c.arg("--kernel").arg(artifact("guest/vmlinux"));
    c.arg("--initrd").arg(artifact("guest/test-initrd.img"));
    c.args(["--console", "stdout", "--memory-mib", &mib.to_string()]);
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
    Ok(Outcome::Passed)
}

/// With a real kernel, so that only the vCPU count can be what is refused: a bad
/// argument (exit status 2) whose reason names the bound.
fn refuses_zero_vcpus_with_a_real_kernel() -> CaseResult {
    skip_unless!(need_artifacts());
    let out = Command::new(vmm_bin()).arg("--kernel").arg(artifact("guest/vmlinux")).args(["--vcpus", "0"]).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure_that!(out.status.code() == Some(2), "wisp-vmm --vcpus 0 exited with {}, want 2; stderr: {err}", out.status);
    ensure_that!(err.contains("--vcpus 0: use a number 1 to 64"), "error does not name the vCPU bound: {err}");
    ensure_that!(err.lines().count() == 1, "want a one-line reason, got: {err}");
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
    let mut child =
        Command::new("sha256sum").stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn()?;
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
    let guest =
        "echo RO=$(cat /sys/block/vda/ro); echo x | dd of=/dev/vda bs=512 conv=fsync 2>/dev/null; echo WROTE=$?";
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
/// The longest a vsock transfer may make no progress before the case fails.
const STALL_TIMEOUT: Duration = Duration::from_secs(120);

fn vsock_host_to_guest_64mib_echo() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    let dir = tempfile::tempdir()?;
    let uds = dir.path().join("vsock.sock");
    let mut c = vmm_cmd(&format!("vsock-probe echo 5000 {TRANSFER}"));
    c.arg("--vsock-uds").arg(&uds);
    let mut vm = Watched::spawn("wisp-vmm", &mut c)?;
    vm.wait_for("listening on port 5000", BOOT_TIMEOUT)?;
    let conn = hybrid_vsock::dial(&uds, 5000, Duration::from_secs(2), Duration::from_secs(60))?;
    // A stalled transfer fails the case instead of hanging the suite.
    conn.set_read_timeout(Some(STALL_TIMEOUT))?;
    conn.set_write_timeout(Some(STALL_TIMEOUT))?;
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
    ensure_that!(
        out.contains(&format!("echoed {TRANSFER} bytes, ack received")),
        "guest did not see all bytes:\n{out}"
    );
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
            s.set_read_timeout(Some(STALL_TIMEOUT))?;
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
    // Debug logging, so that a refusal that is really the VMM's own connect timeout
    // (it closes the host stream then too) shows up in the output.
    c.arg("--vsock-uds").arg(&uds).args(["--log-level", "debug"]);
    let mut vm = Watched::spawn("wisp-vmm", &mut c)?;
    vm.wait_for("listening on port 5000", BOOT_TIMEOUT)?;
    // The caller's timeout only guards against a hang: running out of it is a
    // Handshake error, which fails the case, as does any answer other than a refusal.
    match hybrid_vsock::connect(&uds, 4999, Duration::from_secs(60)) {
        Err(hybrid_vsock::DialError::Refused { .. }) => {}
        Ok(_) => bail!("CONNECT to a port without a listener succeeded"),
        Err(e) => bail!("want a refusal, got: {e}"),
    }
    // The device still works afterwards; closing the echo connection ends the guest.
    let mut s = hybrid_vsock::dial(&uds, 5000, Duration::from_secs(2), Duration::from_secs(30))?;
    s.write_all(b"ping")?;
    let mut back = [0u8; 4];
    s.read_exact(&mut back)?;
    ensure_that!(&back == b"ping", "echo returned {back:?}");
    s.write_all(b"A")?;
    // Checked on the whole output, after the exit, so that the log line cannot still be
    // in the pipe.
    let out = expect_clean_exit(&mut vm)?;
    ensure_that!(
        !out.contains("did not answer the connection request in time"),
        "the guest never refused port 4999: the VMM timed the request out:\n{out}"
    );
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
    for want in ["process_start", "kvm_ready", "devices_ready", "kernel_loaded", "vcpus_started"] {
        ensure_that!(names.contains(&want), "timeline lacks {want}: {names:?}");
    }
    ensure_that!(tl.milestones.windows(2).all(|w| w[0].at_us <= w[1].at_us), "timeline not ordered");
    client.shutdown(ctx(), &ShutdownRequest { grace_ms: 200, ..Default::default() })?;
    let status = vm.wait_exit(Duration::from_secs(30))?;
    ensure_that!(status.success(), "wisp-vmm exited with {status} after Shutdown");
    ensure_that!(!api.exists() && !uds.exists(), "sockets left behind after shutdown");
    Ok(Outcome::Passed)
}

/// The `TICK-n` numbers the guest's counting loop printed in `out`, in order.
fn ticks(out: &str) -> Vec<u64> {
    out.split("TICK-").skip(1).filter_map(|t| t.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()).collect()
}

/// The guest counts on the console (one line a second); the VM is paused and
/// snapshotted through the control API, the first VMM stops, and two new VMMs restore
/// the same snapshot at once (its memory file mapped copy-on-write by both): each goes
/// on counting from where the snapshot was taken, without booting again. A restore whose
/// configuration differs from the snapshot's, or with another snapshot's memory file, is
/// refused with the reason.
fn snapshot_restores_twice_and_the_guests_go_on() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    use wisp_protocols::vmm::{Empty, SnapshotRequest};
    use wisp_protocols::vmm_ttrpc::VmmClient;
    let dir = tempfile::tempdir()?;
    let (state, memory) = (dir.path().join("vm.snap"), dir.path().join("vm.mem"));
    let api = dir.path().join("api.sock");
    let mut c = vmm_cmd_with_memory("i=0; while true; do i=$((i+1)); echo TICK-$i; sleep 1; done", 128);
    c.arg("--api-sock").arg(&api);
    let mut vm = Watched::spawn("wisp-vmm", &mut c)?;
    vm.wait_for("TICK-3", BOOT_TIMEOUT)?;
    let client = VmmClient::new(ttrpc::Client::connect(&format!("unix://{}", api.display()))?);
    let ctx = || ttrpc::context::with_timeout(60_000_000_000);
    let request = SnapshotRequest {
        state_path: state.display().to_string(),
        memory_path: memory.display().to_string(),
        ..Default::default()
    };
    let running = client.snapshot(ctx(), &request);
    ensure_that!(format!("{running:?}").contains("pause it first"), "a snapshot of a running VM: {running:?}");
    client.pause(ctx(), &Empty::new())?;
    client.snapshot(ctx(), &request).context("Snapshot of the paused VM")?;
    vm.signal(libc::SIGTERM);
    vm.wait_exit(Duration::from_secs(30))?;
    // Everything the first VM printed, a line cut by the pause included.
    let at_snapshot = ticks(&vm.output()).into_iter().max().context("no tick before the snapshot")?;
    let mem_meta = std::fs::metadata(&memory)?;
    println!(
        "snapshot after tick {at_snapshot}: state {} bytes, memory file {} MiB, {} MiB on disk",
        std::fs::metadata(&state)?.len(),
        mem_meta.len() >> 20,
        (std::os::unix::fs::MetadataExt::blocks(&mem_meta) * 512) >> 20
    );

    let restore_cmd = |mib: u32| {
        let mut c = Command::new(vmm_bin());
        c.arg("--restore").arg(&state).arg("--restore-memory").arg(&memory);
        c.args(["--console", "stdout", "--memory-mib", &mib.to_string()]);
        c
    };
    let mut a = Watched::spawn("wisp-vmm (restored a)", &mut restore_cmd(128))?;
    let mut b = Watched::spawn("wisp-vmm (restored b)", &mut restore_cmd(128))?;
    let want = format!("TICK-{}", at_snapshot + 3);
    for (name, r) in [("a", &a), ("b", &b)] {
        r.wait_for(&want, BOOT_TIMEOUT).with_context(|| format!("restored VM {name}"))?;
        let out = r.output();
        ensure_that!(!out.contains("Linux version"), "restored VM {name} booted again:\n{out}");
        let first = *ticks(&out).first().context("no tick")?;
        // The next tick; or the one after, when the pause cut the next one's line in
        // two (its start went to the first VM's console, the rest to this one's).
        ensure_that!(
            first == at_snapshot + 1 || first == at_snapshot + 2,
            "restored VM {name} went on at tick {first}, the snapshot was taken after tick {at_snapshot}:\n{out}"
        );
    }
    for r in [&mut a, &mut b] {
        r.signal(libc::SIGTERM);
        r.wait_exit(Duration::from_secs(30))?;
    }

    // Refusals: another memory size, a memory file of another save. Both are refused
    // before the VMM makes a socket, a device or a KVM VM.
    let out = restore_cmd(256).output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure_that!(
        !out.status.success() && err.contains("memory_mib: snapshot 128, this VM 256"),
        "a restore with 256 MiB: {}: {err}",
        out.status
    );
    let other = dir.path().join("other.mem");
    std::fs::copy(&memory, &other)?;
    let mut trailer_id = std::fs::read(&other)?;
    let id_at = trailer_id.len() - 4096 + 12;
    trailer_id[id_at] ^= 1;
    std::fs::write(&other, &trailer_id)?;
    let out = Command::new(vmm_bin())
        .arg("--restore")
        .arg(&state)
        .arg("--restore-memory")
        .arg(&other)
        .args(["--console", "stdout", "--memory-mib", "128"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure_that!(!out.status.success() && err.contains("trailer"), "a damaged memory file: {}: {err}", out.status);
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

/// wisp-vmm sharing `dir` under `tag` (`opts` appended: `,ro`, `,cache=never`); the guest
/// mounts it at /mnt and runs `guest_cmd` (no double quotes: it goes on the kernel
/// command line).
fn virtiofs_cmd(tag: &str, dir: &Path, opts: &str, guest_cmd: &str) -> Command {
    virtiofs_cmd_with_memory(tag, dir, opts, guest_cmd, 256)
}

fn virtiofs_cmd_with_memory(tag: &str, dir: &Path, opts: &str, guest_cmd: &str, mib: u32) -> Command {
    let mut c =
        vmm_cmd_with_memory(&format!("mount -t virtiofs {tag} /mnt && echo MOUNTED-$((6*7)) && {guest_cmd}"), mib);
    c.arg("--shared-dir").arg(format!("{tag}={}{opts}", dir.display()));
    c
}

/// What the guest printed: the console output after its init started (the kernel echoes
/// the command line, markers included, before that).
fn guest_part(out: &str) -> &str {
    out.split_once("WISP-TEST-INIT-STARTED").map_or("", |(_, guest)| guest)
}

fn virtiofs_shares_files_both_ways_and_sees_host_changes() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("hello.txt"), "hello from the host\n")?;
    // The guest polls (up to 20 s) for the changes the host makes once it sees GUEST-WROTE-42.
    let guest =
        "cat /mnt/hello.txt && echo guest-wrote > /mnt/from-guest && mkdir /mnt/gdir && echo GUEST-WROTE-$((6*7)); \
         i=0; until grep -q changed /mnt/hello.txt && [ -e /mnt/gdir/from-host ]; do \
         i=$((i+1)); [ $i -gt 100 ] && break; sleep 0.2; done; echo SEEN-AFTER-TRIES=$i; \
         cat /mnt/hello.txt /mnt/gdir/from-host; busybox umount /mnt && echo UNMOUNTED-$((6*7))";
    let mut vm = Watched::spawn("wisp-vmm", &mut virtiofs_cmd("wisp", dir.path(), "", guest))?;
    vm.wait_for("GUEST-WROTE-42", BOOT_TIMEOUT)?;
    let so_far = vm.output();
    ensure_that!(guest_part(&so_far).contains("hello from the host"), "guest did not read the host file:\n{so_far}");
    let written = std::fs::read_to_string(dir.path().join("from-guest"))?;
    ensure_that!(written == "guest-wrote\n", "file written in the guest has {written:?} on the host");
    ensure_that!(dir.path().join("gdir").is_dir(), "directory made in the guest is not on the host");
    // Change the file in place (same inode, longer) and add a file in the guest's directory.
    std::fs::write(dir.path().join("hello.txt"), "changed on the host, and longer than before\n")?;
    std::fs::write(dir.path().join("gdir/from-host"), "new file from the host\n")?;
    let all = expect_clean_exit(&mut vm)?;
    let out = guest_part(&all);
    let tries = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("SEEN-AFTER-TRIES="))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .context(format!("guest did not report:\n{out}"))?;
    ensure_that!(tries <= 100, "host changes never became visible in the guest:\n{out}");
    ensure_that!(out.contains("changed on the host, and longer than before"), "guest read stale data:\n{out}");
    ensure_that!(out.contains("new file from the host"), "guest did not read the new host file:\n{out}");
    ensure_that!(out.contains("UNMOUNTED-42"), "unmounting the share failed:\n{out}");
    println!("  host changes visible in the guest after {} ms of polling", tries * 200);
    Ok(Outcome::Passed)
}

fn virtiofs_guest_cannot_reach_outside_the_share() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm(), need_root());
    let outer = tempfile::tempdir()?;
    std::fs::write(outer.path().join("HOST-PARENT-MARKER"), "outside the share\n")?;
    let dir = outer.path().join("share");
    std::fs::create_dir(&dir)?;
    std::os::unix::fs::symlink("/etc/shadow", dir.join("evil"))?;
    std::os::unix::fs::symlink("../../../../../../../../etc/shadow", dir.join("evil-rel"))?;
    std::os::unix::fs::symlink("../HOST-PARENT-MARKER", dir.join("up"))?;
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    let guest =
        "cat /mnt/evil; echo CAT-EVIL=$?; cat /mnt/evil-rel; echo CAT-EVIL-REL=$?; cat /mnt/up; echo CAT-UP=$?; \
         echo LS-DOTDOT-BEGIN; ls -a /mnt/.. /mnt/../..; echo LS-DOTDOT-END; \
         cat /mnt/../HOST-PARENT-MARKER; echo CAT-PARENT=$?; echo LINK=$(readlink /mnt/evil)";
    let mut vm = Watched::spawn("wisp-vmm", &mut virtiofs_cmd("wisp", &dir, "", guest))?;
    let all = expect_clean_exit(&mut vm)?;
    let out = guest_part(&all);
    ensure_that!(out.contains("MOUNTED-42"), "mount failed:\n{all}");
    for (what, marker) in
        [("evil", "CAT-EVIL="), ("evil-rel", "CAT-EVIL-REL="), ("up", "CAT-UP="), ("../", "CAT-PARENT=")]
    {
        ensure_that!(out.contains(marker) && !out.contains(&format!("{marker}0")), "cat of {what} succeeded:\n{out}");
    }
    ensure_that!(out.contains("LINK=/etc/shadow"), "readlink does not return the link text:\n{out}");
    ensure_that!(!out.contains("outside the share"), "the guest read a host file outside the share:\n{out}");
    if let Some(first) = shadow.lines().next().filter(|l| !l.is_empty()) {
        ensure_that!(!out.contains(first), "the guest read the host's /etc/shadow:\n{out}");
    }
    let listing = out.split("LS-DOTDOT-BEGIN").nth(1).and_then(|r| r.split("LS-DOTDOT-END").next()).unwrap_or_default();
    ensure_that!(listing.contains("init") && listing.contains("bin"), "/mnt/.. is not the guest's root:\n{out}");
    ensure_that!(!listing.contains("HOST-PARENT-MARKER"), "/mnt/.. shows the host's parent directory:\n{out}");
    Ok(Outcome::Passed)
}

fn virtiofs_read_only_share_refuses_writes() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("hello.txt"), "read only\n")?;
    let guest = "cat /mnt/hello.txt; echo x > /mnt/hello.txt; echo W1=$?; echo y > /mnt/new; echo W2=$?; \
                 mkdir /mnt/d; echo W3=$?; busybox rm /mnt/hello.txt; echo W4=$?; busybox touch /mnt/hello.txt; echo W5=$?";
    let mut vm = Watched::spawn("wisp-vmm", &mut virtiofs_cmd("ro", dir.path(), ",ro", guest))?;
    let all = expect_clean_exit(&mut vm)?;
    let out = guest_part(&all);
    ensure_that!(out.contains("read only"), "guest could not read the read-only share:\n{out}");
    for w in ["W1=", "W2=", "W3=", "W4=", "W5="] {
        ensure_that!(
            out.contains(w) && !out.contains(&format!("{w}0")),
            "a write to the read-only share succeeded ({w}):\n{out}"
        );
    }
    ensure_that!(std::fs::read_to_string(dir.path().join("hello.txt"))? == "read only\n", "host file changed");
    let entries: Vec<_> = std::fs::read_dir(dir.path())?.collect();
    ensure_that!(entries.len() == 1, "the guest created entries in a read-only share");
    Ok(Outcome::Passed)
}

const BIG_FILE: u64 = 256 * MIB;

fn virtiofs_256mib_file_both_ways() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm());
    let dir = tempfile::tempdir()?;
    let (big, copy) = (dir.path().join("big"), dir.path().join("copy"));
    // Made and checked with C tools: a debug-built test loop over 256 MiB is slow here.
    let t = std::time::Instant::now();
    host_secs(&format!("head -c {BIG_FILE} /dev/urandom > {}", big.display()))?;
    let want = sha256_file(&big)?;
    let prep = t.elapsed().as_secs_f64();
    let guest = "sha256sum /mnt/big; dd if=/mnt/big of=/mnt/copy bs=1M conv=fsync 2>/dev/null; echo COPY=$?";
    // 256 MiB through the guest page cache needs headroom beyond the file itself: with
    // 256 MiB of RAM the guest's atomic allocations for FUSE requests can fail. Guest RAM
    // is allocated lazily, so the larger VM costs only what it touches.
    let mut vm = Watched::spawn("wisp-vmm", &mut virtiofs_cmd_with_memory("wisp", dir.path(), "", guest, 1024))?;
    let all = expect_clean_exit(&mut vm)?;
    let out = guest_part(&all);
    ensure_that!(out.contains(&want), "guest read different data (want sha256 {want}):\n{out}");
    ensure_that!(out.contains("COPY=0"), "guest copy failed:\n{out}");
    let t = std::time::Instant::now();
    let cmp = Command::new("cmp").arg(&big).arg(&copy).output()?;
    ensure_that!(
        cmp.status.success(),
        "the file written in the guest differs on the host: {}{}",
        String::from_utf8_lossy(&cmp.stdout).trim(),
        String::from_utf8_lossy(&cmp.stderr).trim()
    );
    println!(
        "  host side: {prep:.1}s to make and hash the file, {:.1}s to compare the copy",
        t.elapsed().as_secs_f64()
    );
    Ok(Outcome::Passed)
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let out = Command::new("sha256sum").arg(path).output()?;
    ensure_that!(out.status.success(), "sha256sum {} failed", path.display());
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string())
}

/// Runs `sh -c script` on this (the emulated) host and returns its wall time in seconds.
fn host_secs(script: &str) -> anyhow::Result<f64> {
    let t = std::time::Instant::now();
    let out = Command::new("sh").arg("-c").arg(script).output()?;
    ensure_that!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(t.elapsed().as_secs_f64())
}
/// A tap interface on this (the emulated) host for one network case; deleted when
/// dropped, so every exit path of the case removes it.
struct HostTap {
    name: String,
}

impl HostTap {
    /// A persistent tap `name` (`ip tuntap add`), given `cidr` and `mtu`, up.
    fn create(name: &str, cidr: &str, mtu: u16) -> anyhow::Result<Self> {
        // A tap left behind by a crashed run would make `add` fail.
        let _ = Command::new("ip").args(["link", "del", name]).output();
        ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        let tap = Self { name: name.to_string() };
        tap.configure(cidr, mtu)?;
        Ok(tap)
    }

    /// Addresses, MTU and link state of a tap that exists (also one another process made).
    fn configure(&self, cidr: &str, mtu: u16) -> anyhow::Result<()> {
        ip(&["link", "set", &self.name, "mtu", &mtu.to_string()])?;
        ip(&["addr", "add", cidr, "dev", &self.name])?;
        ip(&["link", "set", &self.name, "up"])
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        // Fails harmlessly when the tap already went away with its last descriptor.
        let _ = Command::new("ip").args(["link", "del", &self.name]).output();
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    ensure_that!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

fn need_ip_and_tun() -> Option<String> {
    if Command::new("ip").arg("-V").output().map(|o| !o.status.success()).unwrap_or(true) {
        return Some("needs the ip command (iproute2)".into());
    }
    (!Path::new("/dev/net/tun").exists()).then(|| "needs /dev/net/tun (module tun)".to_string())
}

/// One network case's addresses and what crosses the link.
struct NetCase {
    /// The `--net` value.
    net_arg: String,
    mac: &'static str,
    host_ip: &'static str,
    guest_ip: &'static str,
    /// The MTU the guest should report.
    mtu: u16,
    bytes: u64,
}

/// Boots the guest with the tap, then: the guest configures eth0 and pings the host;
/// the host sends `bytes` of pattern over TCP to the guest (busybox `nc -l`), which
/// stores and hashes them and sends them back over a second connection; the host checks
/// every byte. Returns the console output.
fn net_exchange(case: &NetCase) -> anyhow::Result<String> {
    const TO_GUEST_PORT: u16 = 5000;
    const TO_HOST_PORT: u16 = 5001;
    let NetCase { host_ip, guest_ip, bytes, .. } = *case;
    let listener =
        std::net::TcpListener::bind((host_ip, TO_HOST_PORT)).context("listening on the host side of the tap")?;
    let guest = format!(
        "busybox ip link set eth0 up && busybox ip addr add {guest_ip}/24 dev eth0 && echo NET-UP-$((6*7)); \
         echo GUEST-MAC=$(cat /sys/class/net/eth0/address) GUEST-MTU=$(cat /sys/class/net/eth0/mtu); \
         busybox ping -c 3 -W 10 {host_ip} && echo PING-OK-$((6*7)); \
         echo NC-LISTENING-$((6*7)); nc -l -p {TO_GUEST_PORT} > /tmp/in; echo RECEIVED=$(wc -c < /tmp/in); sha256sum /tmp/in; \
         nc {host_ip} {TO_HOST_PORT} < /tmp/in; echo SENT-BACK=$?"
    );
    let mut c = vmm_cmd(&guest);
    c.arg("--net").arg(&case.net_arg);
    let mut vm = Watched::spawn("wisp-vmm", &mut c)?;
    vm.wait_for("NC-LISTENING-42", BOOT_TIMEOUT)?;
    let so_far = vm.output();
    let seen = guest_part(&so_far);
    ensure_that!(seen.contains("NET-UP-42"), "eth0 did not come up:\n{so_far}");
    ensure_that!(seen.contains(&format!("GUEST-MAC={}", case.mac)), "the guest's MAC is not {}:\n{so_far}", case.mac);
    ensure_that!(seen.contains(&format!("GUEST-MTU={}", case.mtu)), "the guest's MTU is not {}:\n{so_far}", case.mtu);
    ensure_that!(seen.contains("PING-OK-42"), "the guest could not ping the host:\n{so_far}");

    // Host to guest: the guest's nc listens (shortly after it says so).
    let addr: std::net::SocketAddr = format!("{guest_ip}:{TO_GUEST_PORT}").parse()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut conn = loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => bail!("cannot connect to the guest at {addr}: {e}\n{}", vm.output()),
        }
    };
    conn.set_write_timeout(Some(STALL_TIMEOUT))?;
    let mut data = vec![0u8; bytes as usize];
    pattern(&mut data, 0);
    let want_sha = sha256(&data)?;
    let t = std::time::Instant::now();
    conn.write_all(&data)?;
    conn.shutdown(std::net::Shutdown::Write)?;
    conn.set_read_timeout(Some(STALL_TIMEOUT))?;
    // The guest's nc closes once it has everything.
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest)?;
    let to_guest = t.elapsed().as_secs_f64();
    drop(conn);

    // Guest to host: the same bytes come back. Checked after the clock stops: the check
    // runs in this debug-built test under emulation and would dominate the time.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = (|| -> anyhow::Result<(Vec<u8>, f64)> {
            let (mut s, _) = listener.accept()?;
            s.set_read_timeout(Some(STALL_TIMEOUT))?;
            let t = std::time::Instant::now();
            let mut back = Vec::with_capacity(bytes as usize);
            s.read_to_end(&mut back)?;
            Ok((back, t.elapsed().as_secs_f64()))
        })();
        let _ = tx.send(r);
    });
    let (back, to_host) =
        rx.recv_timeout(BOOT_TIMEOUT).context("the guest never connected back or never finished")??;
    ensure_that!(back.len() as u64 == bytes, "the host got {} bytes back, sent {bytes}", back.len());
    if back != data {
        let bad = back.iter().zip(&data).position(|(a, b)| a != b).unwrap_or_default();
        bail!("byte {bad} from the guest differs from what the host sent");
    }
    let all = expect_clean_exit(&mut vm)?;
    let out = guest_part(&all);
    ensure_that!(out.contains(&format!("RECEIVED={bytes}")), "the guest did not receive {bytes} bytes:\n{out}");
    ensure_that!(out.contains(&want_sha), "the guest received different bytes (want sha256 {want_sha}):\n{out}");
    ensure_that!(out.contains("SENT-BACK=0"), "the guest's send failed:\n{out}");
    let mib = bytes as f64 / MIB as f64;
    println!(
        "  {mib:.0} MiB host->guest in {to_guest:.2}s ({:.1} MiB/s), guest->host in {to_host:.2}s ({:.1} MiB/s) (emulated host)",
        mib / to_guest,
        mib / to_host
    );
    Ok(all)
}

fn net_tap_by_name_ping_and_16mib_tcp_both_ways() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm(), need_root(), need_ip_and_tun());
    let _tap = HostTap::create("wtap0", "10.203.0.1/24", 1500)?;
    let mac = "02:77:69:73:70:01";
    net_exchange(&NetCase {
        net_arg: format!("tap=wtap0,mac={mac}"),
        mac,
        host_ip: "10.203.0.1",
        guest_ip: "10.203.0.2",
        mtu: 1500,
        bytes: 16 * MIB,
    })?;
    Ok(Outcome::Passed)
}

/// The shim's way: it opens the tap itself and passes the descriptor.
fn net_inherited_tap_fd_with_mtu() -> CaseResult {
    skip_unless!(need_artifacts(), need_full_kvm(), need_root(), need_ip_and_tun());
    use std::os::fd::AsRawFd;
    // The tap exists while a descriptor is open on it: this one, then the VMM's copy.
    let _ = Command::new("ip").args(["link", "del", "wtap1"]).output();
    let tap = wisp_vmm::devices::virtio::net::Tap::open("wtap1")?;
    let host = HostTap { name: "wtap1".into() };
    host.configure("10.203.1.1/24", 1400)?;
    let fd = tap.as_raw_fd();
    // SAFETY: F_SETFD on our own open descriptor: let the VMM inherit it.
    ensure_that!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == 0, "cannot clear close-on-exec");
    let mac = "02:77:69:73:70:2a";
    net_exchange(&NetCase {
        net_arg: format!("fd={fd},mac={},mtu=1400", mac.to_uppercase()),
        mac,
        host_ip: "10.203.1.1",
        guest_ip: "10.203.1.2",
        mtu: 1400,
        bytes: 2 * MIB,
    })?;
    drop(tap);
    // A descriptor that is not a tap is refused with a message naming it.
    let file = std::fs::File::open("/dev/null")?;
    let fd = file.as_raw_fd();
    // SAFETY: as above.
    ensure_that!(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } == 0, "cannot clear close-on-exec");
    let out = Command::new(vmm_bin())
        .args(["--kernel", &artifact("guest/vmlinux").display().to_string(), "--net"])
        .arg(format!("fd={fd},mac={mac}"))
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure_that!(!out.status.success(), "wisp-vmm accepted /dev/null as a tap");
    ensure_that!(err.contains(&format!("descriptor {fd} is not an attached tun/tap queue")), "unclear error: {err}");
    Ok(Outcome::Passed)
}

fn main() {
    Suite::new("vmm_boot")
        .case("refuses_a_file_that_is_not_a_kernel", refuses_a_file_that_is_not_a_kernel)
        .case("refuses_zero_vcpus_with_a_real_kernel", refuses_zero_vcpus_with_a_real_kernel)
        .case("sigterm_ends_the_vm_and_removes_sockets", sigterm_ends_the_vm_and_removes_sockets)
        .case("boots_to_userspace_and_reboot_exits_0", boots_to_userspace_and_reboot_exits_0)
        .case("two_vcpus_are_online", two_vcpus_are_online)
        .case("virtio_blk_reads_and_writes", virtio_blk_reads_and_writes)
        .case("virtio_blk_read_only_refuses_writes", virtio_blk_read_only_refuses_writes)
        .case("vsock_host_to_guest_64mib_echo", vsock_host_to_guest_64mib_echo)
        .case("vsock_guest_to_host_64mib", vsock_guest_to_host_64mib)
        .case("vsock_to_a_port_nobody_listens_on_is_refused", vsock_to_a_port_nobody_listens_on_is_refused)
        .case("control_api_pause_resume_timeline_shutdown", control_api_pause_resume_timeline_shutdown)
        .case("snapshot_restores_twice_and_the_guests_go_on", snapshot_restores_twice_and_the_guests_go_on)
        .case(
            "virtiofs_shares_files_both_ways_and_sees_host_changes",
            virtiofs_shares_files_both_ways_and_sees_host_changes,
        )
        .case("virtiofs_guest_cannot_reach_outside_the_share", virtiofs_guest_cannot_reach_outside_the_share)
        .case("virtiofs_read_only_share_refuses_writes", virtiofs_read_only_share_refuses_writes)
        .case("virtiofs_256mib_file_both_ways", virtiofs_256mib_file_both_ways)
        .case("net_tap_by_name_ping_and_16mib_tcp_both_ways", net_tap_by_name_ping_and_16mib_tcp_both_ways)
        .case("net_inherited_tap_fd_with_mtu", net_inherited_tap_fd_with_mtu)
        .run()
}
