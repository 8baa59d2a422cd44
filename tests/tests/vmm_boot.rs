//! wisp-vmm end to end: real guest kernel boots (emulated KVM host or hardware KVM),
//! vCPUs, console, reboot, virtio-blk, virtio-vsock in both directions, virtio-fs
//! (sharing both ways, host changes, read-only, confinement to the share, 256 MiB files,
//! dd throughput per cache mode), the control API, and clean exits. Run through
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

/// wisp-vmm sharing `dir` under `tag` (`opts` appended: `,ro`, `,cache=never`); the guest
/// mounts it at /mnt and runs `guest_cmd` (no double quotes: it goes on the kernel
/// command line).
fn virtiofs_cmd(tag: &str, dir: &Path, opts: &str, guest_cmd: &str) -> Command {
    virtiofs_cmd_with_memory(tag, dir, opts, guest_cmd, 256)
}

fn virtiofs_cmd_with_memory(tag: &str, dir: &Path, opts: &str, guest_cmd: &str, mib: u32) -> Command {
    let mut c = vmm_cmd_with_memory(&format!("mount -t virtiofs {tag} /mnt && echo MOUNTED-$((6*7)) && {guest_cmd}"), mib);
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
        .case(
            "virtiofs_shares_files_both_ways_and_sees_host_changes",
            virtiofs_shares_files_both_ways_and_sees_host_changes,
        )
        .case("virtiofs_guest_cannot_reach_outside_the_share", virtiofs_guest_cannot_reach_outside_the_share)
        .case("virtiofs_read_only_share_refuses_writes", virtiofs_read_only_share_refuses_writes)
        .case("virtiofs_256mib_file_both_ways", virtiofs_256mib_file_both_ways)
        .run()
}
