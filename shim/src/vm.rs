//! The pod's wisp-vmm process: started with the sandbox configuration, watched by a
//! thread (its death is how the shim learns the VM is gone), its stderr forwarded to
//! the shim log, and stopped through its control API with a kill as the last resort.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use wisp_config::Config;
use wisp_protocols::vmm::ShutdownRequest;
use wisp_protocols::vmm_ttrpc::VmmClient;

/// Guest vsock CID (the VMM's device is per VM, so every VM can use the same one).
const GUEST_CID: u32 = 3;
const STDERR_LINES_KEPT: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("starting {path}: {source}")]
    Spawn { path: String, source: std::io::Error },
    #[error("control API of the VMM: {0}")]
    Api(String),
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
    pub fn vsock(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    pub fn api(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    pub fn shared(&self) -> PathBuf {
        self.dir.join("shared")
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn vmm_pid(&self) -> PathBuf {
        self.dir.join("vmm.pid")
    }
}

#[derive(Default)]
struct ExitState {
    status: Option<String>,
    stderr_tail: Vec<String>,
}

/// A running VMM. Dropping it does not stop it: call `stop`.
pub struct VmmProcess {
    pid: u32,
    paths: SandboxPaths,
    exit: Arc<(Mutex<ExitState>, Condvar)>,
}

impl VmmProcess {
    /// Starts wisp-vmm; `on_exit` runs on the watcher thread when the process ends.
    pub fn start(config: &Config, paths: &SandboxPaths, on_exit: Box<dyn FnOnce(String) + Send>) -> Result<Self, VmError> {
        let h = &config.hypervisor;
        let mut cmd = Command::new(&h.path);
        cmd.arg("--kernel").arg(&h.kernel);
        cmd.arg("--initrd").arg(&h.initrd);
        cmd.arg("--vcpus").arg(h.vcpus.to_string());
        cmd.arg("--memory-mib").arg(h.memory_mib.to_string());
        cmd.arg("--vsock-uds").arg(paths.vsock());
        cmd.arg("--vsock-cid").arg(GUEST_CID.to_string());
        cmd.arg("--api-sock").arg(paths.api());
        cmd.arg("--shared-dir").arg(format!("wisp={}", paths.shared().display()));
        if config.runtime.debug {
            cmd.arg("--console").arg(paths.console());
            cmd.arg("--log-level").arg("info");
        }
        if !h.kernel_params.is_empty() {
            cmd.arg(format!("--cmdline={}", h.kernel_params));
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child: Child =
            cmd.spawn().map_err(|source| VmError::Spawn { path: h.path.display().to_string(), source })?;
        let pid = child.id();
        let _ = std::fs::write(paths.vmm_pid(), pid.to_string());
        let exit = Arc::new((Mutex::new(ExitState::default()), Condvar::new()));

        if let Some(stderr) = child.stderr.take() {
            let exit = exit.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log::info!("wisp-vmm[{pid}]: {line}");
                    let mut st = exit.0.lock().unwrap_or_else(|e| e.into_inner());
                    if st.stderr_tail.len() == STDERR_LINES_KEPT {
                        st.stderr_tail.remove(0);
                    }
                    st.stderr_tail.push(line);
                }
            });
        }
        {
            let exit = exit.clone();
            std::thread::spawn(move || {
                let status = match child.wait() {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                };
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
            });
        }
        Ok(Self { pid, paths: paths.clone(), exit })
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
        let c = ttrpc::Client::connect(&format!("unix://{}", self.paths.api().display())).map_err(|e| VmError::Api(e.to_string()))?;
        Ok(VmmClient::new(c))
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
                let req = ShutdownRequest { grace_ms: grace.as_millis().min(u32::MAX as u128) as u32, ..Default::default() };
                c.shutdown(ctx(), &req).map_err(|e| VmError::Api(e.to_string()))
            })
            .is_ok();
        let wait = if asked { grace + Duration::from_secs(2) } else { Duration::ZERO };
        if self.wait_exit(wait).is_none() {
            log::warn!("wisp-vmm[{}] still running; killing it", self.pid);
            // SAFETY: kill(2) on the pid of our own child, which the watcher has not
            // reaped yet (it would have recorded the exit).
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
            self.wait_exit(Duration::from_secs(5));
        }
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(5_000_000_000)
}
