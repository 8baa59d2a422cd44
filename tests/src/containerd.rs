//! A private containerd for end-to-end tests, the demo and benchmarks: its own config,
//! root, state and socket under a temporary directory, the wisp shim found on its PATH
//! (containerd 1.6 ignores `runtime_path`), wisp configured through `WISP_CONFIG` to
//! use the build's VMM, kernel and initrd, and runc as the peer runtime. It is stopped
//! and its directory removed on drop.
//!
//! containerd 1.6 still uses fixed paths (/run/containerd/s, /run/containerd/fifo): run
//! one at a time per (emulated) host.
//!
//! The CRI plugin is configured too: runtime handlers `runc` and `wisp`, the local pause
//! image (`image::PAUSE_IMAGE`, imported by `import_cri_images`) as the sandbox image,
//! and a private CNI conf dir (empty unless the caller passes network configs).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::process::Watched;

pub const NAMESPACE: &str = "wisp-test";
/// The containerd namespace of the CRI plugin (images for pods must be imported there).
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The longest any single ctr command may take in tests (VM boots are slow under TCG).
pub const CTR_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Option<Watched>,
}

/// Why containerd-based tests cannot run here, if they cannot.
pub fn need_containerd() -> Option<String> {
    for bin in ["/usr/bin/containerd", "/usr/bin/ctr", "/usr/sbin/runc"] {
        if !Path::new(bin).exists() {
            return Some(format!("needs {bin} (Debian packages containerd and runc; run `make deps`)"));
        }
    }
    None
}

/// The wisp config the tests use: the build's artifacts, small VMs. `WISP_TEST_VMM`
/// names another program to run as the VMM (a wrapper that traces the real one, as
/// `vmm/seccomp/collect.sh` does).
pub fn wisp_config(extra: &str) -> String {
    let vmm =
        std::env::var_os("WISP_TEST_VMM").map(PathBuf::from).unwrap_or_else(|| crate::artifact("release/wisp-vmm"));
    wisp_config_with_vmm(&vmm, extra)
}

/// Like `wisp_config`, with `vmm` as the VMM program.
pub fn wisp_config_with_vmm(vmm: &Path, extra: &str) -> String {
    format!(
        "[hypervisor]\npath = \"{}\"\nkernel = \"{}\"\ninitrd = \"{}\"\nmemory_mib = 256\n\n[agent]\ndial_timeout_ms = 120000\ndial_attempt_timeout_ms = 2000\nrpc_timeout_ms = 60000\n\n{extra}",
        vmm.display(),
        crate::artifact("guest/vmlinux").display(),
        crate::artifact("guest/initrd.img").display(),
    )
}

impl Containerd {
    /// Starts containerd with `wisp_toml` as the wisp configuration (`[runtime]` etc.
    /// may be appended by the caller through `wisp_config`) and the build's shim.
    pub fn start(wisp_toml: &str) -> anyhow::Result<Self> {
        Self::launch(Some(wisp_toml), &[])
    }

    /// Like `start`, with CNI network configs `(file name, content)` written to the CRI
    /// plugin's conf dir before containerd starts (containerd 1.6 refuses pods without
    /// host networking while that dir holds no network: "cni config uninitialized").
    pub fn start_with_cni(wisp_toml: &str, cni_confs: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::launch(Some(wisp_toml), cni_confs)
    }

    /// Starts containerd the way an installation runs: the shim from `PATH`, wisp's
    /// configuration from `/etc/wisp/config.toml`.
    pub fn start_installed() -> anyhow::Result<Self> {
        Self::launch(None, &[])
    }

    fn launch(wisp_toml: Option<&str>, cni_confs: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("wisp-containerd-").tempdir()?;
        let d = dir.path();
        let socket = d.join("containerd.sock");
        std::fs::create_dir_all(d.join("cni"))?;
        for (name, conf) in cni_confs {
            std::fs::write(d.join("cni").join(name), conf).with_context(|| format!("writing CNI config {name}"))?;
        }
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
oom_score = 0
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "debug"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "{pause}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.wisp]
      runtime_type = "io.containerd.wisp.v2"
      # CRI passes a pod's annotations to the runtime only when listed here.
      pod_annotations = ["io.wisp.config.*"]
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
            cni = d.join("cni").display(),
            pause = crate::image::PAUSE_IMAGE,
        );
        std::fs::write(d.join("config.toml"), config)?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config").arg(d.join("config.toml"));
        if let Some(toml) = wisp_toml {
            std::fs::write(d.join("wisp.toml"), toml)?;
            let shim_dir = crate::artifact("release");
            let path = format!("{}:{}", shim_dir.display(), std::env::var("PATH").unwrap_or_default());
            cmd.env("PATH", path).env("WISP_CONFIG", d.join("wisp.toml"));
        } else {
            cmd.env_remove("WISP_CONFIG");
        }
        let child = Watched::spawn("containerd", &mut cmd)?;
        let me = Self { dir, socket, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(60);
        eprintln!("containerd: starting in {}", me.dir.path().display());
        loop {
            let probe = crate::process::output_within(&mut me.ctr(&["version"]), None, Duration::from_secs(10));
            if probe.is_ok_and(|o| o.status.success()) {
                eprintln!("containerd: up");
                return Ok(me);
            }
            if Instant::now() > deadline {
                bail!("containerd did not come up within 60 s; its output:\n{}", me.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// containerd's own output so far (shim logs included).
    pub fn log(&self) -> String {
        self.child.as_ref().map(|c| c.output()).unwrap_or_default()
    }

    /// A `ctr` command against this containerd, in the test namespace.
    pub fn ctr(&self, args: &[&str]) -> Command {
        self.ctr_in(NAMESPACE, args)
    }

    /// A `ctr` command against this containerd, in `namespace`.
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&self.socket).arg("--namespace").arg(namespace).args(args);
        c
    }

    /// The CRI plugin's CNI conf dir.
    pub fn cni_dir(&self) -> PathBuf {
        self.dir.path().join("cni")
    }

    /// Runs `ctr args` (at most `CTR_TIMEOUT`) and returns its output.
    pub fn ctr_output(&self, args: &[&str]) -> anyhow::Result<Output> {
        self.ctr_with(args, None)
    }

    /// Runs `ctr args` with `stdin` (at most `CTR_TIMEOUT`); on a timeout the error
    /// carries containerd's log (shim logs included) and the guest consoles.
    pub fn ctr_with(&self, args: &[&str], stdin: Option<&[u8]>) -> anyhow::Result<Output> {
        eprintln!("+ ctr {}", args.join(" "));
        crate::process::output_within(&mut self.ctr(args), stdin, CTR_TIMEOUT)
            .with_context(|| format!("ctr {args:?}\n{}", self.diagnostics()))
    }

    /// The tail of containerd's log and of every guest console under /run/wisp.
    pub fn diagnostics(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let mut out =
            format!("--- containerd log (last 60 lines) ---\n{}\n", lines[lines.len().saturating_sub(60)..].join("\n"));
        for e in std::fs::read_dir("/run/wisp").into_iter().flatten().flatten() {
            if let Ok(c) = std::fs::read_to_string(e.path().join("vmm/console.log")) {
                let l: Vec<&str> = c.lines().collect();
                out += &format!(
                    "--- guest console {} (last 30 lines) ---\n{}\n",
                    e.path().display(),
                    l[l.len().saturating_sub(30)..].join("\n")
                );
            }
        }
        out
    }

    /// Builds and imports the busybox test image; returns its name.
    pub fn import_busybox(&self) -> anyhow::Result<String> {
        let archive = self.dir.path().join("busybox.tar");
        crate::image::build_busybox_image(&archive, crate::image::BUSYBOX_IMAGE)?;
        self.import(NAMESPACE, &archive, crate::image::BUSYBOX_IMAGE)?;
        Ok(crate::image::BUSYBOX_IMAGE.to_string())
    }

    /// Builds and imports, into the CRI namespace, the busybox test image and the pause
    /// image the CRI plugin runs as every pod's sandbox container; returns the busybox
    /// image's name.
    pub fn import_cri_images(&self) -> anyhow::Result<String> {
        let archive = self.dir.path().join("busybox.tar");
        crate::image::build_busybox_image(&archive, crate::image::BUSYBOX_IMAGE)?;
        self.import(CRI_NAMESPACE, &archive, crate::image::BUSYBOX_IMAGE)?;
        let archive = self.dir.path().join("pause.tar");
        crate::image::build_pause_image(&archive)?;
        self.import(CRI_NAMESPACE, &archive, crate::image::PAUSE_IMAGE)?;
        Ok(crate::image::BUSYBOX_IMAGE.to_string())
    }

    /// Imports an image archive into `namespace` under `name`.
    pub fn import(&self, namespace: &str, archive: &Path, name: &str) -> anyhow::Result<()> {
        eprintln!("containerd: importing {name} into namespace {namespace}");
        let args = ["images", "import", &archive.display().to_string()];
        eprintln!("+ ctr -n {namespace} {}", args.join(" "));
        let out = crate::process::output_within(&mut self.ctr_in(namespace, &args), None, CTR_TIMEOUT)
            .with_context(|| format!("ctr {args:?}\n{}", self.diagnostics()))?;
        if !out.status.success() {
            bail!("ctr -n {namespace} images import failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            c.signal(libc::SIGTERM);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait_exit(Duration::from_secs(20));
        }
        // Snapshot mounts may remain if a test failed halfway: detach them before the
        // temporary directory goes.
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            let root = self.dir.path().to_path_buf();
            let mut mounts: Vec<&str> =
                info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|m| Path::new(m).starts_with(&root)).collect();
            mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in mounts {
                let _ = nix_umount(m);
            }
        }
    }
}

fn nix_umount(path: &str) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path)?;
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
