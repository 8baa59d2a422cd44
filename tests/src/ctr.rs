//! containerd + `ctr` as a user runs them, for the end-to-end suites that drive wisp
//! through `ctr` (`tests/ctr.rs`, `tests/hostile.rs`): a private containerd with the
//! busybox image imported, `ctr run` with its exit code and output, and the check that
//! nothing of wisp is left behind.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::containerd::{wisp_config, Containerd};
use crate::procs::{mounts_under, sandbox_dirs, STATE_DIR};

pub const RUNTIME: &str = "io.containerd.wisp.v2";

/// Guest consoles go to /run/wisp/<sid>/vmm/console.log (shown when a case fails).
pub const DEBUG: &str = "[runtime]\ndebug = true\n";

/// Why a ctr suite cannot run here for want of built artifacts, if it cannot.
pub fn need_artifacts() -> Option<String> {
    crate::need_built(&["release/containerd-shim-wisp-v2", "release/wisp-vmm", "guest/vmlinux", "guest/initrd.img"])
}

pub struct Env {
    pub c: Containerd,
    pub image: String,
}

/// A finished command: exit code and output.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from_output(out: std::process::Output) -> Self {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// containerd with the debug wisp config and the busybox image.
pub fn env() -> anyhow::Result<Env> {
    env_with(&wisp_config(DEBUG))
}

pub fn env_with(config: &str) -> anyhow::Result<Env> {
    let c = Containerd::start(config)?;
    let image = c.import_busybox()?;
    Ok(Env { c, image })
}

impl Env {
    /// `ctr run --rm --runtime wisp [flags] IMAGE ID ARGS...`, optional stdin.
    pub fn run(&self, id: &str, flags: &[&str], args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Run> {
        let mut a: Vec<&str> = vec!["run", "--rm", "--runtime", RUNTIME];
        a.extend_from_slice(flags);
        // ctr 1.6 always attaches its stdin to the task (there is no -i).
        a.push(&self.image);
        a.push(id);
        a.extend_from_slice(args);
        let mut r = Run::from_output(self.c.ctr_with(&a, stdin)?);
        if r.stderr.contains("starting the pod's VM") {
            // The VM never answered: containerd's log has the shim's account of it and the
            // guest console's last lines (a kernel that stalled in boot, which the harness
            // reruns inside the emulated host, shows there).
            r.stderr += &format!("\n{}", self.c.diagnostics());
        }
        Ok(r)
    }

    /// `ctr task exec --exec-id EID CID sh -c SCRIPT`.
    pub fn exec(&self, cid: &str, eid: &str, script: &str) -> anyhow::Result<Run> {
        Ok(Run::from_output(self.c.ctr_output(&["task", "exec", "--exec-id", eid, cid, "sh", "-c", script])?))
    }

    /// A ctr command that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.c.ctr_output(args)?;
        if !out.status.success() {
            bail!("ctr {args:?} failed: {}\n{}", String::from_utf8_lossy(&out.stderr), self.c.diagnostics());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// SIGKILL the task, wait until it is stopped, delete task and container. A task
    /// that already stopped (its VM died) cannot be killed: that refusal is not an error
    /// here, the wait below is what counts.
    pub fn kill_and_delete(&self, id: &str) -> anyhow::Result<()> {
        let _ = self.c.ctr_output(&["task", "kill", "-s", "SIGKILL", id])?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.ok(&["task", "ls"])?.contains("STOPPED") {
            if Instant::now() > deadline {
                bail!("task {id} never stopped after SIGKILL");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.ok(&["task", "delete", id])?;
        self.ok(&["container", "delete", id])?;
        Ok(())
    }

    /// Nothing of wisp left: no VMM process, no sandbox dirs, no mounts under /run/wisp.
    pub fn assert_clean(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let vmms = Command::new("pgrep").args(["-x", "wisp-vmm"]).output()?.stdout;
            let dirs = sandbox_dirs();
            let mounts = mounts_under(&[Path::new(STATE_DIR)]);
            if vmms.is_empty() && dirs.is_empty() && mounts.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "left behind: wisp-vmm pids {:?}, dirs {dirs:?}, mounts {mounts:?}",
                    String::from_utf8_lossy(&vmms)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The last 40 lines of `s`.
pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Fails unless `r` exited with `want_code`, showing its output.
pub fn check(r: &Run, want_code: i32, what: &str) -> anyhow::Result<()> {
    if r.code != want_code {
        bail!("{what}: exit {} (want {want_code}); stdout:\n{}\nstderr:\n{}", r.code, tail(&r.stdout), r.stderr);
    }
    Ok(())
}
