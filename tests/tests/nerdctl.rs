//! nerdctl (built by tests/tools/go-tools.sh) with `--runtime io.containerd.wisp.v2`:
//! a container on nerdctl's default CNI bridge network with a published port reached
//! from the host, a bind volume, exec, logs, stats and `rm -f`; and `run -it`. nerdctl
//! networks a container through OCI hooks (createRuntime runs CNI, poststop undoes it),
//! which wisp's shim runs on the host (shim/src/hooks.rs). Each case checks the host
//! afterwards.
//!
//! Runs against the containerd `WISP_CONTAINERD_BIN` selects (`tests/e2e.sh
//! nerdctl@2.4`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use wisp_tests::cni::{http_get, need_cni, CNI_BIN};
use wisp_tests::containerd::{need_containerd, NAMESPACE};
use wisp_tests::ctr::{env as ctr_env, need_artifacts, Env as CtrEnv, RUNTIME};
use wisp_tests::harness::{need_full_kvm, need_root, CaseResult, Outcome, Suite};
use wisp_tests::process::output_within;
use wisp_tests::procs::{all_vmm_pids, host_kernel};
use wisp_tests::rootfs::need_busybox;
use wisp_tests::{ensure_that, go_tool, skip_unless};

const TIMEOUT: Duration = Duration::from_secs(300);

fn need_nerdctl() -> Option<String> {
    go_tool("nerdctl", "nerdctl").err()
}

macro_rules! skip_unless_ready {
    () => {
        skip_unless!(
            need_root(),
            need_containerd(),
            need_busybox(),
            need_artifacts(),
            need_cni(),
            need_nerdctl(),
            need_full_kvm()
        )
    };
}

struct Env {
    e: CtrEnv,
    nerdctl: PathBuf,
    scratch: tempfile::TempDir,
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn env() -> anyhow::Result<Env> {
    let e = ctr_env()?;
    let nerdctl = go_tool("nerdctl", "nerdctl").map_err(anyhow::Error::msg)?;
    let scratch = tempfile::Builder::new().prefix("wisp-nerdctl-").tempdir()?;
    std::fs::create_dir_all(scratch.path().join("netconf"))?;
    Ok(Env { e, nerdctl, scratch })
}

impl Env {
    /// nerdctl's global flags: this containerd, the test namespace, Debian's CNI plugins,
    /// private network configs and data root.
    fn args(&self) -> Vec<String> {
        let d = self.scratch.path();
        vec![
            format!("--address={}", self.e.c.socket.display()),
            format!("--namespace={NAMESPACE}"),
            format!("--cni-path={CNI_BIN}"),
            format!("--cni-netconfpath={}", d.join("netconf").display()),
            format!("--data-root={}", d.join("data").display()),
        ]
    }

    fn nerdctl(&self, args: &[&str]) -> anyhow::Result<Out> {
        eprintln!("+ nerdctl {}", args.join(" "));
        let mut cmd = std::process::Command::new(&self.nerdctl);
        cmd.args(self.args()).args(args);
        let out = output_within(&mut cmd, None, TIMEOUT)
            .with_context(|| format!("nerdctl {args:?}\n{}", self.e.c.diagnostics()))?;
        Ok(Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let o = self.nerdctl(args)?;
        if o.code != 0 {
            bail!("nerdctl {args:?} exited {}: {}\n{}", o.code, o.stderr.trim(), self.e.c.diagnostics());
        }
        Ok(o.stdout.trim().to_string())
    }
}

/// The container's address on nerdctl's default network, as the guest's `eth0` has it.
/// (`nerdctl inspect` cannot tell it for wisp: it looks into the network namespace of the
/// task's pid, and a wisp task's pid is its shim's, on the host; a known gap.)
fn container_ip(n: &Env, name: &str) -> anyhow::Result<String> {
    let eth0 = n.ok(&["exec", name, "ip", "-o", "-4", "addr", "show", "eth0"])?;
    let ip = eth0
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_default()
        .to_string();
    ensure_that!(
        ip.starts_with("10.4.0."),
        "{name}'s eth0 has no address of nerdctl's default network 10.4.0.0/24: {eth0:?}"
    );
    Ok(ip)
}

// ---- cases ----

/// `nerdctl run -d -p -v`, the port from the host, exec, logs, stats, `rm -f`.
fn run_publish_volume_exec_logs_stats_rm() -> CaseResult {
    skip_unless_ready!();
    let n = env()?;
    let www = n.scratch.path().join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), "from-the-volume\n")?;
    let volume = format!("{}:/www", www.display());
    let id = n.ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--name",
        "web",
        "-p",
        "18080:8080",
        "-v",
        &volume,
        &n.e.image,
        "sh",
        "-c",
        "echo web-started; exec httpd -f -p 8080 -h /www",
    ])?;
    ensure_that!(!id.is_empty(), "nerdctl run -d printed no id");
    ensure_that!(all_vmm_pids().len() == 1, "wisp-vmm processes: {:?}", all_vmm_pids());

    let kernel = n.ok(&["exec", "web", "uname", "-r"])?;
    ensure_that!(kernel != host_kernel()?, "nerdctl exec uname -r: {kernel:?} is the host's kernel");
    let ip = container_ip(&n, "web")?;

    // The container's address and the published port, from the host.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let direct = http_get(&ip, 8080, "/index.html");
        let published = http_get("127.0.0.1", 18080, "/index.html");
        let ok = |r: &anyhow::Result<String>| r.as_ref().is_ok_and(|b| b.trim() == "from-the-volume");
        if ok(&direct) && ok(&published) {
            break;
        }
        ensure_that!(
            Instant::now() < deadline,
            "from the host: {ip}:8080 -> {direct:?}; 127.0.0.1:18080 (published) -> {published:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // A write through the volume reaches the host.
    n.ok(&["exec", "web", "sh", "-c", "echo from-the-guest > /www/written"])?;
    let written = std::fs::read_to_string(www.join("written")).unwrap_or_default();
    ensure_that!(written == "from-the-guest\n", "the volume on the host: {written:?}");

    let logs = n.ok(&["logs", "web"])?;
    ensure_that!(logs.contains("web-started"), "nerdctl logs: {logs:?}");
    let stats = n.ok(&["stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}", "web"])?;
    ensure_that!(stats.starts_with("web ") && !stats.contains(" 0B /"), "nerdctl stats: {stats:?}");

    n.ok(&["rm", "-f", "web"])?;
    let ps = n.ok(&["ps", "-a", "-q"])?;
    ensure_that!(ps.is_empty(), "containers after rm -f: {ps:?}");
    n.e.assert_clean()?;
    // poststop ran: the container's address is free again (host-local's reservation).
    let reserved = std::fs::read_dir("/var/lib/cni/networks")
        .into_iter()
        .flatten()
        .flatten()
        .any(|net| net.path().join(&ip).exists());
    ensure_that!(!reserved, "the address {ip} is still reserved after rm -f: nerdctl's poststop hook did not run");
    Ok(Outcome::Passed)
}

/// `nerdctl run --rm -it`: a terminal in the guest, its exit status back.
fn run_interactive_tty() -> CaseResult {
    skip_unless_ready!();
    let n = env()?;
    let line = format!(
        "{} {} run --rm -it --runtime {RUNTIME} --net none {} sh -c 'test -t 0 && test -t 1 && echo tty-ok; exit 7'",
        n.nerdctl.display(),
        n.args().join(" "),
        n.e.image
    );
    eprintln!("+ script -qec \"{line}\" /dev/null");
    let mut script = std::process::Command::new("script");
    script.args(["-qec", &line, "/dev/null"]);
    let out = output_within(&mut script, Some(b""), TIMEOUT)?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure_that!(text.contains("tty-ok"), "nerdctl run -it has no terminal: {text:?}");
    ensure_that!(out.status.code() == Some(7), "nerdctl run -it exit status {:?}, want 7", out.status.code());
    n.e.assert_clean()?;
    Ok(Outcome::Passed)
}

fn main() {
    Suite::new("nerdctl")
        .case("run_publish_volume_exec_logs_stats_rm", run_publish_volume_exec_logs_stats_rm)
        .case("run_interactive_tty", run_interactive_tty)
        .run()
}
