//! A private containerd for end-to-end tests, the demo and benchmarks: its own config,
//! root, state and socket under a temporary directory, the wisp shim found on its PATH
//! (containerd 1.6 ignores `runtime_path`), wisp configured through `WISP_CONFIG` to
//! use the build's VMM, kernel and initrd, and runc as the peer runtime. It is stopped
//! and its directory removed on drop.
//!
//! Which containerd: Debian's 1.6 (`/usr/bin/containerd`, `/usr/bin/ctr`), or, when
//! `WISP_CONTAINERD_BIN` names a directory, the containerd, `ctr` and
//! `containerd-shim-runc-v2` in it (a 2.x build of `tests/tools/go-tools.sh`; `tests/e2e.sh
//! SUITE@2.4` sets it). A 2.x containerd gets a version 3 configuration (its CRI plugin
//! IDs); runc is Debian's for both.
//!
//! containerd still uses fixed paths (/run/containerd/s, /run/containerd/fifo): run one
//! at a time per (emulated) host.
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
    pub build: Build,
    child: Option<Watched>,
}

/// containerd's Go runtime figures (`Containerd::go_runtime`).
#[derive(Clone, Copy, Debug)]
pub struct GoRuntime {
    pub goroutines: u64,
    /// Bytes of live heap objects after a forced collection.
    pub heap_alloc: u64,
}

/// The containerd build the tests run (see the module's documentation).
#[derive(Clone, Debug)]
pub struct Build {
    /// Holds `containerd` and `ctr` (and for 2.x `containerd-shim-runc-v2`).
    pub bin_dir: PathBuf,
    /// As `containerd --version` says it, such as `1.6.20~ds1` or `v2.4.2`.
    pub version: String,
    /// The major version: 1 or 2.
    pub major: u32,
}

impl Build {
    /// The build `WISP_CONTAINERD_BIN` names, else Debian's.
    pub fn selected() -> anyhow::Result<Self> {
        let bin_dir = std::env::var_os("WISP_CONTAINERD_BIN").map(PathBuf::from).unwrap_or_else(|| "/usr/bin".into());
        let containerd = bin_dir.join("containerd");
        let out = Command::new(&containerd)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version", containerd.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        Self::from_version_line(bin_dir, &text)
    }

    /// Parses `containerd --version`: "containerd <package> <version> <revision>".
    fn from_version_line(bin_dir: PathBuf, line: &str) -> anyhow::Result<Self> {
        let version = line
            .split_whitespace()
            .nth(2)
            .with_context(|| format!("unexpected `containerd --version` output: {line:?}"))?;
        let major = version
            .trim_start_matches('v')
            .split('.')
            .next()
            .and_then(|m| m.parse().ok())
            .with_context(|| format!("no major version in {version:?}"))?;
        Ok(Self { bin_dir, version: version.to_string(), major })
    }

    pub fn containerd(&self) -> PathBuf {
        self.bin_dir.join("containerd")
    }

    pub fn ctr(&self) -> PathBuf {
        self.bin_dir.join("ctr")
    }
}

/// Why containerd-based tests cannot run here, if they cannot.
pub fn need_containerd() -> Option<String> {
    let dir = std::env::var_os("WISP_CONTAINERD_BIN").map(PathBuf::from);
    let bins: Vec<PathBuf> = match &dir {
        Some(d) => {
            vec![d.join("containerd"), d.join("ctr"), d.join("containerd-shim-runc-v2"), "/usr/sbin/runc".into()]
        }
        None => vec!["/usr/bin/containerd".into(), "/usr/bin/ctr".into(), "/usr/sbin/runc".into()],
    };
    for bin in bins {
        if !bin.exists() {
            return Some(match &dir {
                Some(d) => format!(
                    "needs {} (WISP_CONTAINERD_BIN={}: build it with tests/tools/go-tools.sh build)",
                    bin.display(),
                    d.display()
                ),
                None => format!("needs {} (Debian packages containerd and runc; run `make deps`)", bin.display()),
            });
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
        let build = Build::selected()?;
        let config = config_toml(&build, d, &socket);
        std::fs::write(d.join("config.toml"), config)?;
        let mut cmd = Command::new(build.containerd());
        cmd.arg("--config").arg(d.join("config.toml"));
        // containerd finds shims on its PATH: the build's own runc shim first, then ours.
        let mut path = std::env::var("PATH").unwrap_or_default();
        if build.major >= 2 {
            path = format!("{}:{path}", build.bin_dir.display());
        }
        if let Some(toml) = wisp_toml {
            std::fs::write(d.join("wisp.toml"), toml)?;
            path = format!("{}:{path}", crate::artifact("release").display());
            cmd.env("WISP_CONFIG", d.join("wisp.toml"));
        } else {
            cmd.env_remove("WISP_CONFIG");
        }
        cmd.env("PATH", path);
        let child = Watched::spawn("containerd", &mut cmd)?;
        eprintln!("containerd {}: starting in {}", build.version, dir.path().display());
        let me = Self { dir, socket, build, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(60);
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
        let mut c = Command::new(self.build.ctr());
        c.arg("--address").arg(&self.socket).arg("--namespace").arg(namespace).args(args);
        c
    }

    /// containerd's debug endpoint (pprof, expvar), a Unix socket beside its own.
    pub fn debug_socket(&self) -> PathBuf {
        PathBuf::from(format!("{}.debug", self.socket.display()))
    }

    /// containerd's goroutines and its Go heap in use right after a garbage collection,
    /// read from its debug endpoint (`/debug/pprof`): what a leak in containerd shows as,
    /// which its RSS (the Go runtime keeps freed memory) does not.
    pub fn go_runtime(&self) -> anyhow::Result<GoRuntime> {
        let goroutines = self.debug_get("/debug/pprof/goroutine?debug=1")?;
        let goroutines = goroutines
            .lines()
            .find_map(|l| l.strip_prefix("goroutine profile: total "))
            .and_then(|n| n.trim().parse().ok())
            .context("no 'goroutine profile: total N' line from containerd's /debug/pprof/goroutine")?;
        // gc=1: the profile is taken after a collection; debug=1 ends it with the MemStats.
        let heap = self.debug_get("/debug/pprof/heap?gc=1&debug=1")?;
        let heap_alloc = heap
            .lines()
            .find_map(|l| l.strip_prefix("# HeapAlloc = "))
            .and_then(|n| n.trim().parse().ok())
            .context("no '# HeapAlloc = N' line from containerd's /debug/pprof/heap")?;
        Ok(GoRuntime { goroutines, heap_alloc })
    }

    /// The body of an HTTP GET of `path` on containerd's debug socket.
    fn debug_get(&self, path: &str) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let socket = self.debug_socket();
        let what = || format!("GET {path} on {}", socket.display());
        let mut s = std::os::unix::net::UnixStream::connect(&socket).with_context(what)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: containerd\r\n\r\n").with_context(what)?;
        let mut reply = String::new();
        s.read_to_string(&mut reply).with_context(what)?;
        let (head, body) = reply.split_once("\r\n\r\n").with_context(|| format!("{}: no HTTP reply", what()))?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            bail!("{}: {}", what(), head.lines().next().unwrap_or(""));
        }
        Ok(body.to_string())
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
        // How every VM of this containerd ended, wherever in the log: a nested triple
        // fault (an emulator fault the harness reruns) must show even when it scrolled
        // out of the lines above.
        let ends: Vec<&str> = lines.iter().copied().filter(|l| l.contains("VM ended")).collect();
        if !ends.is_empty() {
            out += &format!("--- VM ends in containerd's log ---\n{}\n", ends.join("\n"));
        }
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

/// containerd's configuration for a test: its own root, state and sockets, the CRI plugin
/// with handlers `runc` and `wisp`, the local pause image, a private CNI conf dir. 1.6
/// reads version 2; 2.x version 3 (the CRI plugin split into `cri.v1.images` and
/// `cri.v1.runtime`).
fn config_toml(build: &Build, d: &Path, socket: &Path) -> String {
    let common = format!(
        r#"root = "{root}"
state = "{state}"
oom_score = 0
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  level = "debug"
  address = "{sock}.debug"
"#,
        root = d.join("root").display(),
        state = d.join("state").display(),
        sock = socket.display(),
    );
    // CRI passes a pod's annotations to the runtime only when its handler lists them.
    let handlers = r#"default_runtime_name = "runc"
    [{P}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [{P}.containerd.runtimes.wisp]
      runtime_type = "io.containerd.wisp.v2"
      pod_annotations = ["io.wisp.config.*"]"#;
    let cni = d.join("cni");
    let pause = crate::image::PAUSE_IMAGE;
    if build.major >= 2 {
        let p = "plugins.'io.containerd.cri.v1.runtime'";
        format!(
            r#"version = 3
{common}[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{pause}"
[{p}]
  restrict_oom_score_adj = true
  [{p}.containerd]
    {handlers}
  [{p}.cni]
    bin_dirs = ["/usr/lib/cni"]
    conf_dir = "{cni}"
"#,
            handlers = handlers.replace("{P}", p),
            cni = cni.display(),
        )
    } else {
        let p = r#"plugins."io.containerd.grpc.v1.cri""#;
        format!(
            r#"version = 2
{common}[{p}]
  restrict_oom_score_adj = true
  sandbox_image = "{pause}"
  [{p}.containerd]
    snapshotter = "overlayfs"
    {handlers}
  [{p}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
"#,
            handlers = handlers.replace("{P}", p),
            cni = cni.display(),
        )
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // A case that failed halfway may leave tasks: their shims would outlive this
        // containerd and hold their sandboxes (the next case's same ids then fail).
        let timeout = Duration::from_secs(60);
        let tasks = crate::process::output_within(&mut self.ctr(&["task", "ls", "-q"]), None, timeout);
        for id in tasks.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default().lines() {
            eprintln!("containerd: removing task {id} left by the case");
            let _ = crate::process::output_within(&mut self.ctr(&["task", "delete", "-f", id]), None, timeout);
            let _ = crate::process::output_within(&mut self.ctr(&["container", "delete", id]), None, timeout);
        }
        if let Some(c) = &self.child {
            c.signal(libc::SIGTERM);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait_exit(Duration::from_secs(20));
        }
        // Snapshot mounts may remain if a test failed halfway: detach them before the
        // temporary directory goes.
        // Deepest first, and a path as often as mounts are stacked on it.
        if let Ok(entries) = wisp_shim::mountinfo::read() {
            let mut mounts: Vec<PathBuf> =
                entries.into_iter().map(|e| e.mount_point).filter(|m| m.starts_with(self.dir.path())).collect();
            mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
            for m in mounts {
                let _ = nix_umount(&m);
            }
        }
    }
}

fn nix_umount(path: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_containerd_version() {
        let b = Build::from_version_line(
            "/usr/bin".into(),
            "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1\n",
        )
        .unwrap();
        assert_eq!((b.major, b.version.as_str()), (1, "1.6.20~ds1"));
        let b =
            Build::from_version_line("/x".into(), "containerd github.com/containerd/containerd/v2 v2.4.2 \n").unwrap();
        assert_eq!(b.major, 2);
        let e = Build::from_version_line("/x".into(), "garbage").unwrap_err();
        assert!(e.to_string().contains("unexpected `containerd --version` output"), "{e}");
    }

    #[test]
    fn each_major_gets_its_own_config_schema() {
        let d = Path::new("/tmp/x");
        let v1 = Build { bin_dir: "/usr/bin".into(), version: "1.6.20".into(), major: 1 };
        let c = config_toml(&v1, d, &d.join("s"));
        assert!(c.starts_with("version = 2"));
        assert!(c.contains(r#"[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.wisp]"#), "{c}");
        let v2 = Build { major: 2, ..v1.clone() };
        let c = config_toml(&v2, d, &d.join("s"));
        assert!(c.starts_with("version = 3"));
        assert!(c.contains("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.wisp]"), "{c}");
        assert!(c.contains("pinned_images"), "{c}");
        for c in [config_toml(&v1, d, &d.join("s")), config_toml(&v2, d, &d.join("s"))] {
            assert!(c.parse::<toml::Table>().is_ok(), "not TOML: {c}");
        }
    }
}
