//! The pod's wisp-vmm process: started with the sandbox configuration, watched by a
//! thread (its death is how the shim learns the VM is gone), its stderr forwarded to
//! the shim log, and stopped through its control API with a kill as the last resort.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use wisp_config::Config;
use wisp_protocols::vmm::{Empty, ShutdownRequest, SnapshotRequest};
use wisp_protocols::vmm_ttrpc::VmmClient;

use crate::cgroup::{VmmCgroup, CGROUP_ROOT};
use crate::pidfd::{PidFd, VmmRecord};
use crate::spawn::SpawnSpec;

/// Guest vsock CID (the VMM's device is per VM, so every VM can use the same one).
const GUEST_CID: u32 = 3;
const STDERR_LINES_KEPT: usize = 20;
/// The VMM's stderr lines forwarded to the shim's log: a burst of 100 (a VMM's start and
/// end say a few dozen things at most), then 5 a second. The rest are counted and the
/// count logged. The VMM budgets what the guest can make it log, but this is the
/// shim's own bound on what reaches containerd's log, whatever the VMM does.
const STDERR_LOG_BURST: u32 = 100;
const STDERR_LOG_PER_SEC: u32 = 5;
/// The longest VMM stderr line kept or forwarded; longer ones are cut (and what is
/// past this is never held in memory).
const STDERR_LINE_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("starting {path}: {source}")]
    Spawn { path: String, source: std::io::Error },
    #[error("passing tap fd {fd} to the VMM: {source}")]
    NetFd { fd: RawFd, source: std::io::Error },
    #[error("control API of the VMM: {0}")]
    Api(String),
    #[error("placing the VMM in the pod's cgroup: {0}")]
    Cgroup(String),
}

/// Files of one sandbox under the state directory.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    pub dir: PathBuf,
}

impl SandboxPaths {
    pub fn new(state_dir: &Path, sandbox_id: &str) -> Self {
        Self { dir: state_dir.join(sandbox_id) }
    }
    /// The VMM's own directory (its sockets and console log): the one directory of the
    /// sandbox it may write to by path, bound into its jail.
    pub fn vmm_dir(&self) -> PathBuf {
        self.dir.join("vmm")
    }
    pub fn vsock(&self) -> PathBuf {
        self.vmm_dir().join("vsock.sock")
    }
    pub fn api(&self) -> PathBuf {
        self.vmm_dir().join("api.sock")
    }
    /// The guest's read-only view of the share (`share.rs`).
    pub fn shared(&self) -> PathBuf {
        self.dir.join(crate::share::VIEW)
    }
    pub fn console(&self) -> PathBuf {
        self.vmm_dir().join("console.log")
    }
    /// Where the VMM mounts its jail's tmpfs (in its own mount namespace: from the host
    /// this stays an empty directory).
    pub fn jail(&self) -> PathBuf {
        self.dir.join("jail")
    }
    /// The VMM's pid and start time (`pidfd::VmmRecord`).
    pub fn vmm_pid(&self) -> PathBuf {
        self.dir.join("vmm.pid")
    }
}

/// A tap for one of the VM's virtio-net devices: the fd (opened with IFF_TAP, IFF_NO_PI
/// and IFF_VNET_HDR), and the MAC and MTU of the guest NIC.
pub struct NetDevice<'a> {
    pub tap: BorrowedFd<'a>,
    pub mac: String,
    pub mtu: u32,
}

/// wisp-vmm's `--net` value for a tap that is fd `fd` in the VMM.
pub fn net_arg(fd: RawFd, mac: &str, mtu: u32) -> String {
    if mtu == 0 {
        format!("fd={fd},mac={mac}")
    } else {
        format!("fd={fd},mac={mac},mtu={mtu}")
    }
}

/// Copies of the taps for the child: close-on-exec here (so no other child inherits
/// them), numbered 3 or more (the child's stdio setup owns 0-2); the child clears
/// close-on-exec on exactly these numbers, so the VMM sees them under the same numbers.
fn inheritable_taps(net: &[NetDevice<'_>]) -> Result<Vec<OwnedFd>, VmError> {
    net.iter()
        .map(|n| {
            let fd = n.tap.as_raw_fd();
            // SAFETY: F_DUPFD_CLOEXEC on a valid borrowed fd; the new fd is ours alone.
            let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
            if dup < 0 {
                return Err(VmError::NetFd { fd, source: std::io::Error::last_os_error() });
            }
            // SAFETY: `dup` was just returned by fcntl and nothing else owns it.
            Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) })
        })
        .collect()
}

#[derive(Default)]
struct ExitState {
    status: Option<String>,
    stderr_tail: Vec<String>,
}

/// What the VM starts from.
#[derive(Debug, Clone, Copy)]
pub enum VmImage<'a> {
    /// A boot of the configured kernel and initrd.
    Boot,
    /// A template's snapshot (`template.rs`): its state and memory files.
    Restore { state: &'a Path, memory: &'a Path },
}

/// A running VMM. Dropping it does not stop it: call `stop`.
pub struct VmmProcess {
    pid: u32,
    /// The VMM's pidfd, opened before it could be reaped: signals go to it and to no
    /// process that gets its pid later.
    pidfd: PidFd,
    paths: SandboxPaths,
    exit: Arc<(Mutex<ExitState>, Condvar)>,
}

impl VmmProcess {
    /// Starts wisp-vmm with a virtio-net device per tap in `net`, jailed (PID 1 of a new
    /// PID namespace, `--jail`) unless the config turns that off, in the cgroup
    /// `cgroups_path` names if given; `on_exit` runs on the watcher thread when the
    /// process ends.
    pub fn start(
        config: &Config,
        image: VmImage<'_>,
        paths: &SandboxPaths,
        net: &[NetDevice<'_>],
        cgroups_path: Option<&str>,
        on_exit: Box<dyn FnOnce(String) + Send>,
    ) -> Result<Self, VmError> {
        let h = &config.hypervisor;
        let mut args: Vec<OsString> = Vec::new();
        let mut arg = |a: &str, v: &dyn AsRef<std::ffi::OsStr>| {
            args.push(a.into());
            args.push(v.as_ref().to_owned());
        };
        match image {
            VmImage::Boot => {
                arg("--kernel", &h.kernel);
                arg("--initrd", &h.initrd);
            }
            VmImage::Restore { state, memory } => {
                arg("--restore", &state);
                arg("--restore-memory", &memory);
            }
        }
        arg("--vcpus", &h.vcpus.to_string());
        arg("--memory-mib", &h.memory_mib.to_string());
        arg("--vsock-uds", &paths.vsock());
        arg("--vsock-cid", &GUEST_CID.to_string());
        arg("--api-sock", &paths.api());
        arg("--shared-dir", &format!("{}={}", crate::vmpod::SHARED_FS_TAG, paths.shared().display()));
        if config.runtime.debug {
            arg("--console", &paths.console());
            arg("--log-level", &"info");
        }
        let mkdir = |p: PathBuf| {
            std::fs::DirBuilder::new().mode(0o700).create(&p).or_else(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(VmError::Spawn { path: p.display().to_string(), source: e })
                }
            })
        };
        mkdir(paths.vmm_dir())?;
        if h.jail {
            mkdir(paths.jail())?;
            arg("--jail", &paths.jail());
        }
        let taps = inheritable_taps(net)?;
        for (tap, n) in taps.iter().zip(net) {
            arg("--net", &net_arg(tap.as_raw_fd(), &n.mac, n.mtu));
        }
        if !h.seccomp {
            args.push("--no-seccomp".into());
        }
        // A restored guest booted with the template's command line (its shape has it).
        if !h.kernel_params.is_empty() && matches!(image, VmImage::Boot) {
            args.push(format!("--cmdline={}", h.kernel_params).into());
        }
        let spawn_err = |source: std::io::Error| VmError::Spawn { path: h.path.display().to_string(), source };
        let mut spec = SpawnSpec::new(&h.path, &args).map_err(spawn_err)?;
        spec.keep_fds = taps.iter().map(|t| t.as_raw_fd()).collect();
        spec.new_pid_ns = h.jail;
        let cgroup = match cgroups_path.filter(|p| !p.is_empty()) {
            Some(p) => VmmCgroup::create(Path::new(CGROUP_ROOT), p).map_err(|e| VmError::Cgroup(e.to_string()))?,
            None => None,
        };
        if let Some(cg) = &cgroup {
            spec.cgroup_procs = Some(cg.procs().map_err(|e| VmError::Cgroup(e.to_string()))?);
        }
        let exit = Arc::new((Mutex::new(ExitState::default()), Condvar::new()));

        // The watcher thread starts the VMM (its parent-death signal follows the thread
        // that cloned it, so that thread must live as long as the VMM), reports the
        // spawn, then waits for the VMM's end.
        let (spawned_tx, spawned_rx) = std::sync::mpsc::sync_channel(1);
        {
            let exit = exit.clone();
            std::thread::Builder::new()
                .name("vmm-watch".into())
                .spawn(move || {
                    let spawned = spec.spawn();
                    // The child has its copies of the taps now (or failed); ours go.
                    drop(taps);
                    let pid = match spawned.and_then(|s| identify(s.pid).map(|(fd, started)| (s, fd, started))) {
                        Ok(spawned) => {
                            let pid = spawned.0.pid;
                            let _ = spawned_tx.send(Ok(spawned));
                            pid
                        }
                        Err(e) => {
                            let _ = spawned_tx.send(Err(e));
                            return;
                        }
                    };
                    let status = match crate::spawn::wait(pid) {
                        Ok(s) => describe_exit(s),
                        Err(e) => format!("wait failed: {e}"),
                    };
                    // The VMM is gone: its cgroup is empty and can go.
                    drop(cgroup);
                    // Give the stderr reader a moment to collect the last words.
                    std::thread::sleep(Duration::from_millis(50));
                    let reason = {
                        let (lock, cv) = &*exit;
                        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
                        let reason = match st.stderr_tail.last() {
                            Some(last) => format!("wisp-vmm {status}: {last}"),
                            None => format!("wisp-vmm {status}"),
                        };
                        st.status = Some(reason.clone());
                        cv.notify_all();
                        reason
                    };
                    on_exit(reason);
                })
                .map_err(spawn_err)?;
        }
        let (spawned, pidfd, start_time) = spawned_rx
            .recv()
            .map_err(|_| spawn_err(std::io::Error::other("the VMM watcher thread ended before spawning")))?
            .map_err(spawn_err)?;
        let record = VmmRecord { pid: spawned.pid, start_time };
        // For `delete` after this shim died (`cleanup.rs`): pid and start time.
        let _ = std::fs::write(paths.vmm_pid(), record.to_file_text());
        let pid = spawned.pid as u32;
        {
            let exit = exit.clone();
            let stderr = spawned.stderr;
            std::thread::spawn(move || {
                let mut forward = StderrForward::new(pid);
                let mut reader = BufReader::new(stderr);
                while let Some(line) = read_line_capped(&mut reader, STDERR_LINE_MAX) {
                    for entry in forward.line(&line, Instant::now()) {
                        log::info!("{entry}");
                    }
                    // The tail (the VM-ended reason) keeps every line, rate limit or not.
                    let mut st = exit.0.lock().unwrap_or_else(|e| e.into_inner());
                    if st.stderr_tail.len() == STDERR_LINES_KEPT {
                        st.stderr_tail.remove(0);
                    }
                    st.stderr_tail.push(line);
                }
                if let Some(entry) = forward.finish() {
                    log::info!("{entry}");
                }
            });
        }
        Ok(Self { pid, pidfd, paths: paths.clone(), exit })
    }

    /// Why the VMM ended, if it has.
    pub fn exited(&self) -> Option<String> {
        self.exit.0.lock().unwrap_or_else(|e| e.into_inner()).status.clone()
    }

    /// Waits up to `timeout` for the process to end.
    pub fn wait_exit(&self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.exit;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        while st.status.is_none() {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = cv.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        st.status.clone()
    }

    fn api(&self) -> Result<VmmClient, VmError> {
        let c = ttrpc::Client::connect(&format!("unix://{}", self.paths.api().display()))
            .map_err(|e| VmError::Api(e.to_string()))?;
        Ok(VmmClient::new(c))
    }

    /// Writes a snapshot of the running VM to `state` and `memory` (paths the VMM can
    /// write: in its own directory) and lets it run on. The VMM refuses a snapshot while
    /// a vsock connection is open, and the guest's side of one the caller just closed
    /// may still be closing: the VM is resumed and the snapshot tried again until
    /// `deadline`.
    pub fn snapshot(&self, state: &Path, memory: &Path, deadline: Duration) -> Result<(), VmError> {
        let api = self.api()?;
        let call = |what: &str, r: ttrpc::Result<wisp_protocols::vmm::Empty>| {
            r.map(drop).map_err(|e| VmError::Api(format!("{what}: {e}")))
        };
        let req = SnapshotRequest {
            state_path: state.display().to_string(),
            memory_path: memory.display().to_string(),
            ..Default::default()
        };
        let start = Instant::now();
        loop {
            call("Pause", api.pause(snapshot_ctx(), &Empty::new()))?;
            let taken = call("Snapshot", api.snapshot(snapshot_ctx(), &req));
            call("Resume", api.resume(snapshot_ctx(), &Empty::new()))?;
            match taken {
                Err(VmError::Api(e)) if e.contains("vsock") && start.elapsed() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// Stops the VM: the guest has `grace` to end by itself (the caller asked the agent
    /// first), then the VMM is told to stop, then killed.
    pub fn stop(&self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let asked = self
            .api()
            .and_then(|c| {
                let req =
                    ShutdownRequest { grace_ms: grace.as_millis().min(u32::MAX as u128) as u32, ..Default::default() };
                c.shutdown(ctx(), &req).map_err(|e| VmError::Api(e.to_string()))
            })
            .is_ok();
        let wait = if asked { grace + Duration::from_secs(2) } else { Duration::ZERO };
        if self.wait_exit(wait).is_none() {
            log::warn!("wisp-vmm[{}] still running; killing it", self.pid);
            match self.pidfd.send_signal(libc::SIGKILL) {
                // ESRCH: it ended (and was reaped) meanwhile.
                Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
                    log::warn!("wisp-vmm[{}]: cannot kill it: {e}", self.pid)
                }
                _ => {}
            }
            self.wait_exit(Duration::from_secs(5));
        }
    }
}

/// The pidfd and start time of the VMM just spawned, taken before anything can reap it
/// (only the watcher thread does, after this), so both name that very process. If they
/// cannot be had (pidfd_open needs Linux 5.3), the child is killed by pid (still
/// unreaped, so the pid is still its own) and reaped, and the start fails.
fn identify(pid: libc::pid_t) -> std::io::Result<(PidFd, u64)> {
    let identity = PidFd::open(pid)
        .map_err(|e| std::io::Error::new(e.kind(), format!("pidfd_open for the VMM (Linux 5.3 or later): {e}")))
        .and_then(|fd| Ok((fd, crate::pidfd::start_time(pid)?)));
    if identity.is_err() {
        // SAFETY: kill(2) on our own child, which nothing has reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = crate::spawn::wait(pid);
    }
    identity
}

/// The next line of `r` as text without its newline (control characters replaced, at
/// most `max` bytes with a note of what was cut; the rest of a longer line is read and
/// thrown away, never held), or `None` at the end or on a read error.
fn read_line_capped(r: &mut impl BufRead, max: usize) -> Option<String> {
    let mut line = Vec::new();
    let mut cut = 0usize;
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if buf.is_empty() {
            if line.is_empty() && cut == 0 {
                return None;
            }
            break;
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = max.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        cut += chunk.len().saturating_sub(room);
        let used = done.unwrap_or(chunk.len());
        r.consume(used);
        if done.is_some() {
            break;
        }
    }
    let mut text = crate::bounds::guest_text(&String::from_utf8_lossy(&line), max, false);
    if cut > 0 {
        text.push_str(&format!(" [... {cut} more bytes cut]"));
    }
    Some(text)
}

/// What of the VMM's stderr goes to the shim's log: each line as `wisp-vmm[PID]: ...`
/// under a token bucket, and a count of the lines the bucket refused, logged with the
/// next line let through (and at the end).
struct StderrForward {
    pid: u32,
    limit: crate::bounds::RateLimit,
    dropped: u64,
}

impl StderrForward {
    fn new(pid: u32) -> Self {
        Self { pid, limit: crate::bounds::RateLimit::new(STDERR_LOG_PER_SEC, STDERR_LOG_BURST), dropped: 0 }
    }

    /// The log entries for one stderr line read at `now` (none, the line, or a drop
    /// count and the line).
    fn line(&mut self, line: &str, now: Instant) -> Vec<String> {
        if !self.limit.allow_at(now) {
            self.dropped += 1;
            return Vec::new();
        }
        let mut entries = Vec::with_capacity(2);
        entries.extend(self.drop_note());
        entries.push(format!("wisp-vmm[{}]: {line}", self.pid));
        entries
    }

    /// At the end of the stream: the count of lines dropped since the last one logged.
    fn finish(&mut self) -> Option<String> {
        self.drop_note()
    }

    fn drop_note(&mut self) -> Option<String> {
        let n = std::mem::take(&mut self.dropped);
        (n > 0).then(|| format!("wisp-vmm[{}]: {n} lines from wisp-vmm dropped (rate limit)", self.pid))
    }
}

/// How the VMM ended, for the log and the pod's error messages.
fn describe_exit(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if s.signal() == Some(libc::SIGSYS) {
        format!("{s}: killed by its seccomp filter (a system call outside its thread's allow-list)")
    } else {
        s.to_string()
    }
}

/// A snapshot writes the guest's memory (tens of MiB, more for big VMs): its own
/// deadline.
fn snapshot_ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(60).as_nanos() as i64)
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(5_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn vmm_stderr_is_rate_limited_and_the_drops_counted() {
        let mut f = StderrForward::new(42);
        let t0 = Instant::now();
        for i in 0..STDERR_LOG_BURST {
            assert_eq!(f.line(&format!("line {i}"), t0), vec![format!("wisp-vmm[42]: line {i}")]);
        }
        // A flood: nothing more goes to the log at once.
        for _ in 0..10_000 {
            assert!(f.line("flood", t0).is_empty());
        }
        // A second later the rate allows a few again; the first says what was dropped.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(
            f.line("after", later),
            vec![
                "wisp-vmm[42]: 10000 lines from wisp-vmm dropped (rate limit)".to_string(),
                "wisp-vmm[42]: after".into()
            ]
        );
        assert_eq!(f.line("next", later), vec!["wisp-vmm[42]: next".to_string()]);
        assert_eq!(f.finish(), None);
        let mut n = 0;
        while !f.line("x", later).is_empty() {
            n += 1;
        }
        assert!(n < STDERR_LOG_PER_SEC, "{n}");
        assert_eq!(f.finish().as_deref(), Some("wisp-vmm[42]: 1 lines from wisp-vmm dropped (rate limit)"));
    }

    #[test]
    fn vmm_stderr_lines_are_capped_and_cannot_forge_entries() {
        let long = "a".repeat(5000);
        let mut input = b"short\n".to_vec();
        input.extend_from_slice(long.as_bytes());
        input.extend_from_slice(b"\nbad \x1b[2J\xff utf-8\r\nlast without newline");
        let mut r = std::io::BufReader::with_capacity(64, &input[..]);
        assert_eq!(read_line_capped(&mut r, 100).as_deref(), Some("short"));
        let cut = read_line_capped(&mut r, 100).unwrap();
        assert!(cut.starts_with(&"a".repeat(100)) && cut.ends_with("[... 4900 more bytes cut]"), "{cut}");
        assert_eq!(read_line_capped(&mut r, 100).as_deref(), Some("bad ?[2J\u{fffd} utf-8?"));
        assert_eq!(read_line_capped(&mut r, 100).as_deref(), Some("last without newline"));
        assert_eq!(read_line_capped(&mut r, 100), None);
    }

    #[test]
    fn net_args_name_fd_mac_and_mtu() {
        assert_eq!(net_arg(3, "02:00:0a:58:00:05", 1450), "fd=3,mac=02:00:0a:58:00:05,mtu=1450");
        assert_eq!(net_arg(4, "02:00:0a:58:00:06", 0), "fd=4,mac=02:00:0a:58:00:06");
    }

    /// A stand-in VMM reports which file each `--net fd=N` is, and every file it has
    /// open: each tap must arrive exactly once, under the number its argument names.
    #[test]
    fn taps_reach_the_vmm_under_the_fds_its_arguments_name() {
        let dir = tempfile::tempdir().unwrap();
        let report = dir.path().join("report");
        let script = dir.path().join("fake-vmm");
        let body = format!(
            "#!/bin/sh\nexec >{} 2>&1\nfor a in \"$@\"; do case $a in fd=*) n=${{a#fd=}}; n=${{n%%,*}}; \
             echo \"arg $a -> $(readlink /proc/$$/fd/$n)\";; esac; done\n\
             for f in /proc/$$/fd/*; do echo \"open $(readlink $f)\"; done\n",
            report.display()
        );
        std::fs::write(&script, body).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let tap_a = std::fs::File::create(dir.path().join("tap-a")).unwrap();
        let tap_b = std::fs::File::create(dir.path().join("tap-b")).unwrap();
        let mut config = Config::default();
        config.hypervisor.path = script;
        // Not jailed: this runs as any user (a PID namespace needs root).
        config.hypervisor.jail = false;
        let paths = SandboxPaths::new(dir.path(), "sb");
        std::fs::create_dir_all(&paths.dir).unwrap();
        let net = [
            NetDevice { tap: tap_a.as_fd(), mac: "02:00:00:00:00:0a".into(), mtu: 1450 },
            NetDevice { tap: tap_b.as_fd(), mac: "02:00:00:00:00:0b".into(), mtu: 0 },
        ];
        let mut tries = 0;
        let vm = loop {
            // A fork in another test thread can hold the script open for writing a moment.
            match VmmProcess::start(&config, VmImage::Boot, &paths, &net, None, Box::new(|_| {})) {
                Err(VmError::Spawn { source, .. }) if source.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other.unwrap(),
            }
        };
        assert!(vm.wait_exit(Duration::from_secs(10)).is_some(), "the stand-in VMM did not exit");
        let text = std::fs::read_to_string(&report).unwrap();
        let a = dir.path().join("tap-a").display().to_string();
        let b = dir.path().join("tap-b").display().to_string();
        let args: Vec<&str> = text.lines().filter(|l| l.starts_with("arg ")).collect();
        assert_eq!(args.len(), 2, "{text}");
        assert!(args[0].contains(",mac=02:00:00:00:00:0a,mtu=1450 -> ") && args[0].ends_with(&a), "{text}");
        assert!(args[1].contains(",mac=02:00:00:00:00:0b -> ") && args[1].ends_with(&b), "{text}");
        for tap in [&a, &b] {
            let open = text.lines().filter(|l| l.starts_with("open ") && l.ends_with(tap.as_str())).count();
            assert_eq!(open, 1, "{tap} must be open exactly once in the VMM:\n{text}");
        }
    }
}
