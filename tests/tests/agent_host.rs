//! wisp-agent in host test mode: real containers (busybox rootfs, libcontainer) on this
//! host, driven over the agent's ttrpc API and stdio streams exactly as the shim does,
//! without a VM. Needs root. Each case starts its own agent with its own state dir and
//! cgroup parent, and removes all of it (agent, cgroups, temp dirs) when it ends,
//! passed or failed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use wisp_protocols::agent::*;
use wisp_protocols::agent_ttrpc::AgentClient;
use wisp_protocols::stdio::{StreamHeader, StreamKind, ATTACHED};
use wisp_tests::harness::{need_root, CaseResult, Outcome, Suite};
use wisp_tests::rootfs::{busybox_rootfs, need_busybox};
use wisp_tests::{ensure_that, skip_unless};

const RPC_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- the agent

/// The agent under test: `WISP_AGENT_BIN` (e.g. the static release build), else the
/// debug build, built here first. A failed build fails the case: an older binary left
/// in the target directory would test code other than the tree's.
fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("WISP_AGENT_BIN") {
        return Ok(PathBuf::from(bin));
    }
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "wisp-agent"])
            .current_dir(wisp_tests::workspace_root())
            .status()
            .map_err(|e| format!("running cargo build -p wisp-agent: {e}"))?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("cargo build -p wisp-agent failed: {st}"))
        }
    });
    match built {
        Ok(()) => Ok(wisp_tests::artifact("debug/wisp-agent")),
        Err(e) => bail!("{e}"),
    }
}

fn cgroup_v2() -> bool {
    Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
}

/// One agent in host mode, with everything it may leave behind.
struct Agent {
    child: Option<Child>,
    dir: tempfile::TempDir,
    cgroup_parent: String,
    client: Option<AgentClient>,
    rootfs: Vec<tempfile::TempDir>,
}

impl Agent {
    fn start() -> anyhow::Result<Self> {
        let bin = agent_binary()?;
        let dir = tempfile::Builder::new().prefix("wisp-agent-").tempdir()?;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cgroup_parent = format!("/wisp-test-{}-{n}", std::process::id());
        let api = dir.path().join("api.sock");
        let stdio = dir.path().join("stdio.sock");
        let child = Command::new(&bin)
            .arg("--listen")
            .arg(format!("unix:{}", api.display()))
            .arg("--stdio-listen")
            .arg(format!("unix:{}", stdio.display()))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--cgroup-parent")
            .arg(&cgroup_parent)
            .env("WISP_AGENT_LOG", std::env::var("WISP_AGENT_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut agent = Agent { child: Some(child), dir, cgroup_parent, client: None, rootfs: Vec::new() };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if api.exists() && stdio.exists() {
                if let Ok(c) = ttrpc::Client::connect(&format!("unix://{}", api.display())) {
                    agent.client = Some(AgentClient::new(c));
                    if agent.check().is_ok() {
                        return Ok(agent);
                    }
                }
            }
            if let Some(Some(st)) = agent.child.as_mut().map(|c| c.try_wait().ok().flatten()) {
                bail!("wisp-agent exited at start: {st}");
            }
            if Instant::now() > deadline {
                bail!("wisp-agent did not answer within 20 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn api(&self) -> &AgentClient {
        self.client.as_ref().expect("connected in Agent::start")
    }

    fn ctx() -> ttrpc::context::Context {
        ttrpc::context::with_timeout(RPC_TIMEOUT.as_nanos() as i64)
    }

    fn stdio_sock(&self) -> PathBuf {
        self.dir.path().join("stdio.sock")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn check(&self) -> anyhow::Result<CheckResponse> {
        let r = self.api().check(
            Self::ctx(),
            &CheckRequest { api_version: wisp_protocols::AGENT_API_VERSION, ..Default::default() },
        )?;
        ensure_that!(r.api_version == wisp_protocols::AGENT_API_VERSION, "agent speaks API {}", r.api_version);
        Ok(r)
    }

    /// A fresh busybox rootfs, kept until the agent is dropped.
    fn rootfs(&mut self) -> anyhow::Result<PathBuf> {
        let r = busybox_rootfs()?;
        let p = r.path().to_path_buf();
        self.rootfs.push(r);
        Ok(p)
    }

    fn create(&self, id: &str, spec: &Value, stdio: StdioSpec, sandbox: bool) -> ttrpc::Result<Empty> {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: serde_json::to_vec(spec).unwrap_or_default(),
            stdio: Some(stdio).into(),
            sandbox_container: sandbox,
            ..Default::default()
        };
        self.api().create_container(Self::ctx(), &req)
    }

    fn start_container(&self, id: &str) -> anyhow::Result<u32> {
        let r = self
            .api()
            .start_container(Self::ctx(), &ContainerRequest { container_id: id.into(), ..Default::default() })?;
        Ok(r.pid)
    }

    fn wait(&self, id: &str, exec: &str) -> anyhow::Result<i32> {
        let r = self
            .api()
            .wait_process(
                Self::ctx(),
                &ProcessRequest { container_id: id.into(), exec_id: exec.into(), ..Default::default() },
            )
            .with_context(|| format!("waiting for {id}/{exec:?}"))?;
        Ok(r.exit_status)
    }

    fn remove(&self, id: &str) -> anyhow::Result<()> {
        self.api()
            .remove_container(
                Self::ctx(),
                &RemoveContainerRequest { container_id: id.into(), timeout_ms: 10_000, ..Default::default() },
            )
            .with_context(|| format!("removing {id}"))?;
        Ok(())
    }

    fn signal(&self, id: &str, exec: &str, signal: i32, all: bool) -> ttrpc::Result<Empty> {
        self.api().signal_process(
            Self::ctx(),
            &SignalProcessRequest {
                container_id: id.into(),
                exec_id: exec.into(),
                signal: signal as u32,
                all,
                ..Default::default()
            },
        )
    }

    fn exec(&self, id: &str, exec: &str, process: &Value, stdio: StdioSpec) -> ttrpc::Result<StartProcessResponse> {
        self.api().exec_process(
            Self::ctx(),
            &ExecProcessRequest {
                container_id: id.into(),
                exec_id: exec.into(),
                process_json: serde_json::to_vec(process).unwrap_or_default(),
                stdio: Some(stdio).into(),
                ..Default::default()
            },
        )
    }

    /// Opens one stdio stream and checks the agent attached it.
    fn attach(&self, id: &str, exec: &str, kind: StreamKind) -> anyhow::Result<UnixStream> {
        let mut s = UnixStream::connect(self.stdio_sock())?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        StreamHeader { container_id: id.into(), exec_id: exec.into(), stream: kind }.write_to(&mut s)?;
        let mut ack = [0xffu8];
        s.read_exact(&mut ack).context("reading the stream's answer")?;
        ensure_that!(ack[0] == ATTACHED, "agent refused the {kind:?} stream of {id}/{exec:?} (answer {})", ack[0]);
        Ok(s)
    }

    /// The container's cgroup file (v1: under the given controller's hierarchy).
    fn cgroup_file(&self, id: &str, v1_controller: &str, file: &str) -> PathBuf {
        let rel = format!("{}/{id}", self.cgroup_parent.trim_start_matches('/'));
        if cgroup_v2() {
            Path::new("/sys/fs/cgroup").join(rel).join(file)
        } else {
            Path::new("/sys/fs/cgroup").join(v1_controller).join(rel).join(file)
        }
    }

    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let rel = self.cgroup_parent.trim_start_matches('/');
        if cgroup_v2() {
            return vec![Path::new("/sys/fs/cgroup").join(rel)];
        }
        std::fs::read_dir("/sys/fs/cgroup")
            .map(|rd| rd.flatten().map(|e| e.path().join(rel)).filter(|p| p.is_dir()).collect())
            .unwrap_or_default()
    }

    /// Leftovers of container `id`: its bundle, libcontainer state, cgroups.
    fn leftovers(&self, id: &str) -> Vec<String> {
        let mut found = Vec::new();
        for p in [self.state_dir().join("bundles").join(id), self.state_dir().join("c").join(id)] {
            if p.exists() {
                found.push(p.display().to_string());
            }
        }
        for d in self.cgroup_dirs() {
            if d.join(id).exists() {
                found.push(d.join(id).display().to_string());
            }
        }
        found
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill with a pid we own.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        for d in self.cgroup_dirs() {
            remove_cgroup_tree(&d);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // SAFETY: killing a leftover test process.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- specs

fn process(args: &[&str]) -> Value {
    json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"],
        "cwd": "/",
        "capabilities": {
            "bounding": caps(), "effective": caps(), "permitted": caps()
        },
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true
    })
}

fn caps() -> Value {
    json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE"
    ])
}

fn spec(rootfs: &Path, args: &[&str]) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "root": {"path": rootfs, "readonly": false},
        "hostname": "wisp-test",
        "process": process(args),
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

fn pipes(stdin: bool) -> StdioSpec {
    StdioSpec { stdin, stdout: true, stderr: true, ..Default::default() }
}

fn read_stream(mut s: UnixStream) -> anyhow::Result<String> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).context("reading a stdio stream to its end")?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn code_of<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> anyhow::Result<ttrpc::Code> {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => Ok(s.code()),
        Err(e) => Err(anyhow!("expected an RPC status, got {e:?}")),
        Ok(v) => Err(anyhow!("expected an error, got {v:?}")),
    }
}

/// Runs a container to its end; returns (exit status, stdout, stderr).
fn run_to_end(agent: &Agent, id: &str, spec: &Value) -> anyhow::Result<(i32, String, String)> {
    agent.create(id, spec, pipes(false), false).with_context(|| format!("creating {id}"))?;
    let out = agent.attach(id, "", StreamKind::Stdout)?;
    let err = agent.attach(id, "", StreamKind::Stderr)?;
    agent.start_container(id)?;
    let status = agent.wait(id, "")?;
    let (o, e) = (read_stream(out)?, read_stream(err)?);
    agent.remove(id)?;
    Ok((status, o, e))
}

macro_rules! setup {
    () => {{
        skip_unless!(need_root(), need_busybox());
        Agent::start()?
    }};
}

// ---------------------------------------------------------------- cases

fn exit_codes() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    let (st, _, _) = run_to_end(&a, "exit0", &spec(&root, &["true"]))?;
    ensure_that!(st == 0, "true exited {st}");
    let (st, _, _) = run_to_end(&a, "exit3", &spec(&root, &["sh", "-c", "exit 3"]))?;
    ensure_that!(st == 3, "exit 3 gave {st}");
    let (st, _, _) = run_to_end(&a, "exit255", &spec(&root, &["sh", "-c", "exit 255"]))?;
    ensure_that!(st == 255, "exit 255 gave {st}");
    a.check()?;
    Ok(Outcome::Passed)
}

fn output_is_complete_on_immediate_exit() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    // More output than a pipe holds, from a process that ends right after writing it.
    let s = spec(&root, &["sh", "-c", "seq 1 100000; echo done-on-stderr >&2"]);
    a.create("seq", &s, pipes(false), false)?;
    a.start_container("seq")?;
    let out = a.attach("seq", "", StreamKind::Stdout)?;
    let err = a.attach("seq", "", StreamKind::Stderr)?;
    let (out, err) = (read_stream(out)?, read_stream(err)?);
    ensure_that!(a.wait("seq", "")? == 0, "seq failed");
    let lines: Vec<&str> = out.lines().collect();
    ensure_that!(lines.len() == 100_000, "got {} lines of 100000", lines.len());
    ensure_that!(lines.last() == Some(&"100000"), "last line {:?}", lines.last());
    ensure_that!(err.trim() == "done-on-stderr", "stderr {err:?}");
    // A process that has exited before anyone attached: its output waits in the pipe.
    a.create("early", &spec(&root, &["sh", "-c", "seq 1 5000; echo bye >&2"]), pipes(false), false)?;
    a.start_container("early")?;
    ensure_that!(a.wait("early", "")? == 0, "early failed");
    let out = read_stream(a.attach("early", "", StreamKind::Stdout)?)?;
    let err = read_stream(a.attach("early", "", StreamKind::Stderr)?)?;
    ensure_that!(
        out.lines().count() == 5000 && out.ends_with("5000\n"),
        "early stdout has {} lines",
        out.lines().count()
    );
    ensure_that!(err == "bye\n", "early stderr {err:?}");
    a.remove("seq")?;
    a.remove("early")?;
    Ok(Outcome::Passed)
}

fn stdin_is_piped_with_eof() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    a.create("cat", &spec(&root, &["sh", "-c", "cat; echo eof-seen"]), pipes(true), false)?;
    let mut input = a.attach("cat", "", StreamKind::Stdin)?;
    let out = a.attach("cat", "", StreamKind::Stdout)?;
    a.start_container("cat")?;
    let payload: String = (0..2000).map(|i| format!("line {i}\n")).collect();
    input.write_all(payload.as_bytes())?;
    input.shutdown(std::net::Shutdown::Write)?;
    let got = read_stream(out)?;
    ensure_that!(got == format!("{payload}eof-seen\n"), "cat echoed {} bytes, want {}", got.len(), payload.len() + 9);
    ensure_that!(a.wait("cat", "")? == 0, "cat failed");
    // The stdin stream closed before anything was written (the shim's CloseIO on a
    // process given no input): EOF too.
    a.create("cat2", &spec(&root, &["sh", "-c", "cat; echo closed"]), pipes(true), false)?;
    let input = a.attach("cat2", "", StreamKind::Stdin)?;
    let out = a.attach("cat2", "", StreamKind::Stdout)?;
    a.start_container("cat2")?;
    input.shutdown(std::net::Shutdown::Write)?;
    ensure_that!(read_stream(out)? == "closed\n", "closing an unused stdin stream did not give EOF");
    a.remove("cat")?;
    a.remove("cat2")?;
    Ok(Outcome::Passed)
}

fn exec_into_running_container() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    a.create("box", &spec(&root, &["sleep", "1000"]), pipes(false), false)?;
    a.start_container("box")?;
    let pid =
        a.exec("box", "e1", &process(&["sh", "-c", "echo hello from exec; echo oops >&2; exit 7"]), pipes(false))?.pid;
    ensure_that!(pid > 0, "exec pid {pid}");
    let out = read_stream(a.attach("box", "e1", StreamKind::Stdout)?)?;
    let err = read_stream(a.attach("box", "e1", StreamKind::Stderr)?)?;
    ensure_that!(a.wait("box", "e1")? == 7, "exec exit status");
    ensure_that!(out == "hello from exec\n" && err == "oops\n", "exec output {out:?} / {err:?}");
    // Exec with stdin, sees the container's filesystem and hostname.
    a.exec("box", "e2", &process(&["sh", "-c", "read x; echo got-$x-$(hostname)"]), pipes(true))?;
    let mut i = a.attach("box", "e2", StreamKind::Stdin)?;
    let o = a.attach("box", "e2", StreamKind::Stdout)?;
    i.write_all(b"ping\n")?;
    drop(i);
    ensure_that!(read_stream(o)? == "got-ping-wisp-test\n", "exec with stdin");
    ensure_that!(a.wait("box", "e2")? == 0, "exec e2 status");
    // Duplicate of a live exec id is refused; an unknown exec is not found.
    a.exec("box", "live", &process(&["sleep", "1000"]), StdioSpec::default())?;
    let dup = a.exec("box", "live", &process(&["true"]), StdioSpec::default());
    ensure_that!(code_of(dup)? == ttrpc::Code::ALREADY_EXISTS, "duplicate exec id");
    ensure_that!(
        code_of(a.api().wait_process(
            Agent::ctx(),
            &ProcessRequest { container_id: "box".into(), exec_id: "nope".into(), ..Default::default() }
        ))? == ttrpc::Code::NOT_FOUND,
        "unknown exec"
    );
    let missing = a.exec("box", "e3", &process(&["/no/such/binary"]), pipes(false));
    ensure_that!(missing.is_err(), "exec of a missing binary must fail");
    a.remove("box")?;
    ensure_that!(a.leftovers("box").is_empty(), "leftovers: {:?}", a.leftovers("box"));
    Ok(Outcome::Passed)
}

fn signals_map_to_runc_statuses() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    a.create("sig", &spec(&root, &["sleep", "1000"]), pipes(false), false)?;
    a.start_container("sig")?;
    a.exec("sig", "t", &process(&["sleep", "1000"]), StdioSpec::default())?;
    a.signal("sig", "t", libc::SIGTERM, false)?;
    let st = a.wait("sig", "t")?;
    ensure_that!(st == 143, "SIGTERM gave {st}, want 143");
    let again = a.signal("sig", "t", libc::SIGTERM, false);
    ensure_that!(code_of(again)? == ttrpc::Code::NOT_FOUND, "signal to an exited process");
    ensure_that!(code_of(a.signal("sig", "", 999, false))? == ttrpc::Code::INVALID_ARGUMENT, "bad signal number");
    a.signal("sig", "", libc::SIGKILL, false)?;
    let st = a.wait("sig", "")?;
    ensure_that!(st == 137, "SIGKILL gave {st}, want 137");
    // Many concurrent waiters all get the status.
    let waiters: Vec<_> = (0..4).map(|_| a.wait("sig", "")).collect();
    ensure_that!(waiters.iter().all(|w| matches!(w, Ok(137))), "late waiters: {waiters:?}");
    // kill --all on a container whose init traps TERM.
    a.create(
        "all",
        &spec(&root, &["sh", "-c", "trap 'exit 42' TERM; while true; do sleep 0.1; done"]),
        pipes(false),
        false,
    )?;
    a.start_container("all")?;
    std::thread::sleep(Duration::from_millis(300));
    a.signal("all", "", libc::SIGTERM, true)?;
    let st = a.wait("all", "")?;
    ensure_that!(st == 42, "trapped TERM gave {st}");
    a.remove("sig")?;
    a.remove("all")?;
    Ok(Outcome::Passed)
}

fn tty_and_resize() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    let tty = StdioSpec { stdin: true, stdout: true, terminal: true, ..Default::default() };
    a.create(
        "tty",
        &spec(&root, &["sh", "-c", "stty size; [ -t 0 ] && echo is-a-tty; read x; echo got-$x"]),
        tty.clone(),
        false,
    )?;
    let mut s = a.attach("tty", "", StreamKind::Tty)?;
    a.api().tty_win_resize(
        Agent::ctx(),
        &TtyWinResizeRequest {
            container_id: "tty".into(),
            exec_id: String::new(),
            rows: 33,
            cols: 111,
            ..Default::default()
        },
    )?;
    a.start_container("tty")?;
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(b"typed\n")?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&out);
    ensure_that!(text.contains("33 111"), "stty size printed {text:?}");
    ensure_that!(text.contains("is-a-tty"), "stdin is not a tty: {text:?}");
    ensure_that!(text.contains("got-typed"), "input did not reach the tty: {text:?}");
    ensure_that!(a.wait("tty", "")? == 0, "tty container status");
    // Exec with a terminal in a running container.
    a.create("tty2", &spec(&root, &["sleep", "1000"]), StdioSpec::default(), false)?;
    a.start_container("tty2")?;
    a.exec(
        "tty2",
        "t",
        &process(&["sh", "-c", "sleep 0.3; stty size"]),
        StdioSpec { stdout: true, terminal: true, ..Default::default() },
    )?;
    a.api().tty_win_resize(
        Agent::ctx(),
        &TtyWinResizeRequest {
            container_id: "tty2".into(),
            exec_id: "t".into(),
            rows: 12,
            cols: 34,
            ..Default::default()
        },
    )?;
    let text = read_stream(a.attach("tty2", "t", StreamKind::Tty)?)?;
    ensure_that!(text.contains("12 34"), "exec stty size printed {text:?}");
    let not_tty = a
        .api()
        .tty_win_resize(Agent::ctx(), &TtyWinResizeRequest { container_id: "tty2".into(), ..Default::default() });
    ensure_that!(code_of(not_tty)? == ttrpc::Code::FAILED_PRECONDITION, "resize of a non-tty process");
    a.remove("tty")?;
    a.remove("tty2")?;
    Ok(Outcome::Passed)
}

fn user_and_groups() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    let mut s =
        spec(&root, &["sh", "-c", "id -u; id -g; id -G; touch /root/x 2>/dev/null && echo wrote || echo denied"]);
    s["process"]["user"] = json!({"uid": 1000, "gid": 1000, "additionalGids": [2000, 3000]});
    let (st, out, err) = run_to_end(&a, "user", &s)?;
    ensure_that!(st == 0, "status {st}, stderr {err}");
    let lines: Vec<&str> = out.lines().collect();
    ensure_that!(lines.first() == Some(&"1000"), "id -u: {out:?}");
    ensure_that!(lines.get(1) == Some(&"1000"), "id -g: {out:?}");
    ensure_that!(lines.get(2).is_some_and(|l| l.contains("2000") && l.contains("3000")), "id -G: {out:?}");
    ensure_that!(lines.get(3) == Some(&"denied"), "uid 1000 could write /root: {out:?}");
    Ok(Outcome::Passed)
}

fn read_only_rootfs_and_env_cwd() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    let mut s = spec(&root, &["sh", "-c", "echo $GREETING; pwd; ulimit -n; touch /newfile"]);
    s["root"]["readonly"] = json!(true);
    s["process"]["env"] = json!(["PATH=/bin", "GREETING=hi-there"]);
    s["process"]["cwd"] = json!("/tmp");
    s["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 321, "soft": 321}]);
    let (st, out, err) = run_to_end(&a, "ro", &s)?;
    ensure_that!(st != 0, "touch on a read-only rootfs succeeded");
    ensure_that!(err.contains("Read-only"), "stderr {err:?}");
    ensure_that!(out == "hi-there\n/tmp\n321\n", "env/cwd/rlimit output {out:?}");
    ensure_that!(!root.join("newfile").exists(), "file created in the read-only rootfs");
    Ok(Outcome::Passed)
}

fn seccomp_applies_to_init_and_execs() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    let mut s = spec(&root, &["sh", "-c", "mkdir /tmp/a 2>/dev/null && echo made || echo blocked; sleep 1000"]);
    s["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]
    });
    a.create("sc", &s, pipes(false), false)?;
    let init_out = a.attach("sc", "", StreamKind::Stdout)?;
    a.start_container("sc")?;
    let probe = "mkdir /tmp/b 2>/dev/null && echo made || echo blocked";
    a.exec("sc", "nnp", &process(&["sh", "-c", probe]), pipes(false))?;
    let with_nnp = read_stream(a.attach("sc", "nnp", StreamKind::Stdout)?)?;
    let mut p = process(&["sh", "-c", probe]);
    p["noNewPrivileges"] = json!(false);
    a.exec("sc", "priv", &p, pipes(false))?;
    let without_nnp = read_stream(a.attach("sc", "priv", StreamKind::Stdout)?)?;
    ensure_that!(with_nnp == "blocked\n", "exec (no_new_privileges) under seccomp: {with_nnp:?}");
    ensure_that!(without_nnp == "blocked\n", "exec without no_new_privileges under seccomp: {without_nnp:?}");
    a.remove("sc")?;
    let init = read_stream(init_out)?;
    ensure_that!(init == "blocked\n", "init under seccomp: {init:?}");
    Ok(Outcome::Passed)
}

fn oom_kill_is_reported() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    let mut s = spec(&root, &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"]);
    s["linux"]["resources"] = json!({"memory": {"limit": 16 << 20, "swap": 16 << 20}});
    a.create("oom", &s, pipes(false), false)?;
    a.start_container("oom")?;
    let ctx = ttrpc::context::with_timeout(Duration::from_secs(30).as_nanos() as i64);
    let ev = a.api().get_oom_event(ctx, &Empty::new()).context("GetOomEvent")?;
    ensure_that!(ev.container_id == "oom", "OOM event for {:?}", ev.container_id);
    let st = a.wait("oom", "")?;
    ensure_that!(st == 137, "OOM-killed init exited {st}");
    let stats = a
        .api()
        .stats_container(Agent::ctx(), &ContainerRequest { container_id: "oom".into(), ..Default::default() })?;
    ensure_that!(stats.memory.oom_kill_events >= 1, "stats oom_kill_events {}", stats.memory.oom_kill_events);
    a.remove("oom")?;
    Ok(Outcome::Passed)
}

fn stats_and_process_list() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    let s = spec(&root, &["sh", "-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 1000"]);
    a.create("stats", &s, StdioSpec::default(), false)?;
    let pid = a.start_container("stats")?;
    std::thread::sleep(Duration::from_millis(800));
    let st = a
        .api()
        .stats_container(Agent::ctx(), &ContainerRequest { container_id: "stats".into(), ..Default::default() })?;
    ensure_that!(st.cpu.usage_usec > 0, "cpu usage {}", st.cpu.usage_usec);
    ensure_that!(st.memory.usage > 0, "memory usage {}", st.memory.usage);
    ensure_that!(st.pids.current >= 1, "pids {}", st.pids.current);
    let procs = a
        .api()
        .list_processes(Agent::ctx(), &ContainerRequest { container_id: "stats".into(), ..Default::default() })?;
    ensure_that!(procs.pids.contains(&pid), "process list {:?} lacks init {pid}", procs.pids);
    let gd = a.api().guest_details(Agent::ctx(), &Empty::new())?;
    ensure_that!(gd.mem_total_bytes > 0 && gd.cpus >= 1 && !gd.cgroup_controllers.is_empty(), "guest details {gd:?}");
    a.remove("stats")?;
    Ok(Outcome::Passed)
}

fn pause_resume_and_update() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    a.create("pz", &spec(&root, &["sleep", "1000"]), StdioSpec::default(), false)?;
    let req = ContainerRequest { container_id: "pz".into(), ..Default::default() };
    let early = a.api().pause_container(Agent::ctx(), &req);
    ensure_that!(code_of(early)? == ttrpc::Code::FAILED_PRECONDITION, "pause of a created container");
    a.start_container("pz")?;
    a.api().pause_container(Agent::ctx(), &req)?;
    let frozen = || -> String {
        if cgroup_v2() {
            std::fs::read_to_string(a.cgroup_file("pz", "", "cgroup.freeze")).unwrap_or_default().trim().to_string()
        } else {
            std::fs::read_to_string(a.cgroup_file("pz", "freezer", "freezer.state"))
                .unwrap_or_default()
                .trim()
                .to_string()
        }
    };
    let f = frozen();
    ensure_that!(f == "FROZEN" || f == "1", "freezer state after pause: {f:?}");
    ensure_that!(
        code_of(a.api().pause_container(Agent::ctx(), &req))? == ttrpc::Code::FAILED_PRECONDITION,
        "double pause"
    );
    ensure_that!(
        code_of(a.exec("pz", "x", &process(&["true"]), StdioSpec::default()))? == ttrpc::Code::FAILED_PRECONDITION,
        "exec while paused"
    );
    a.api().resume_container(Agent::ctx(), &req)?;
    let f = frozen();
    ensure_that!(f == "THAWED" || f == "0", "freezer state after resume: {f:?}");
    ensure_that!(
        code_of(a.api().resume_container(Agent::ctx(), &req))? == ttrpc::Code::FAILED_PRECONDITION,
        "double resume"
    );

    let res = json!({"memory": {"limit": 32 << 20}, "pids": {"limit": 50}});
    a.api().update_container(
        Agent::ctx(),
        &UpdateContainerRequest {
            container_id: "pz".into(),
            resources_json: serde_json::to_vec(&res)?,
            ..Default::default()
        },
    )?;
    let (mem_file, pids_file) = if cgroup_v2() {
        (a.cgroup_file("pz", "", "memory.max"), a.cgroup_file("pz", "", "pids.max"))
    } else {
        (a.cgroup_file("pz", "memory", "memory.limit_in_bytes"), a.cgroup_file("pz", "pids", "pids.max"))
    };
    let mem = std::fs::read_to_string(&mem_file).unwrap_or_default();
    let pids = std::fs::read_to_string(&pids_file).unwrap_or_default();
    ensure_that!(mem.trim() == (32u64 << 20).to_string(), "{}: {mem:?}", mem_file.display());
    ensure_that!(pids.trim() == "50", "{}: {pids:?}", pids_file.display());
    let bad = a.api().update_container(
        Agent::ctx(),
        &UpdateContainerRequest {
            container_id: "pz".into(),
            resources_json: b"{\"memory\": 5}".to_vec(),
            ..Default::default()
        },
    );
    ensure_that!(code_of(bad)? == ttrpc::Code::INVALID_ARGUMENT, "malformed resources");
    // A paused container is removed too.
    a.api().pause_container(Agent::ctx(), &req)?;
    a.remove("pz")?;
    ensure_that!(a.leftovers("pz").is_empty(), "leftovers {:?}", a.leftovers("pz"));
    Ok(Outcome::Passed)
}

fn pod_shares_ipc_and_uts() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    let mut sb = spec(&root, &["sleep", "1000"]);
    sb["hostname"] = json!("pod-a");
    a.create("pause", &sb, StdioSpec::default(), true)?;
    a.start_container("pause")?;
    a.exec(
        "pause",
        "ns",
        &process(&["sh", "-c", "readlink /proc/self/ns/ipc; readlink /proc/self/ns/pid"]),
        pipes(false),
    )?;
    let sandbox_ns = read_stream(a.attach("pause", "ns", StreamKind::Stdout)?)?;

    let root2 = a.rootfs()?;
    let mut member = spec(&root2, &["sh", "-c", "readlink /proc/self/ns/ipc; readlink /proc/self/ns/pid; hostname"]);
    // Host-side paths as containerd would send them: the agent must not use them.
    member["linux"]["namespaces"] = json!([
        {"type": "pid"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}, {"type": "uts", "path": "/proc/1/ns/uts"},
        {"type": "mount"}, {"type": "network", "path": "/proc/1/ns/net"}
    ]);
    member.as_object_mut().map(|m| m.remove("hostname"));
    let (st, out, err) = run_to_end(&a, "app", &member)?;
    ensure_that!(st == 0, "member failed: {err}");
    let s: Vec<&str> = sandbox_ns.lines().collect();
    let m: Vec<&str> = out.lines().collect();
    ensure_that!(s.len() == 2 && m.len() == 3, "outputs {sandbox_ns:?} / {out:?}");
    ensure_that!(s[0] == m[0], "IPC namespaces differ: sandbox {} member {}", s[0], m[0]);
    ensure_that!(s[1] != m[1], "member was put in the sandbox's PID namespace without asking");
    ensure_that!(m[2] == "pod-a", "member hostname {:?}, want the pod's", m[2]);
    let host_ipc = std::fs::read_link("/proc/self/ns/ipc")?;
    ensure_that!(Path::new(m[0]) != host_ipc, "member is in the host's IPC namespace");
    // A second sandbox container is refused.
    let again = a.create("pause2", &sb, StdioSpec::default(), true);
    ensure_that!(code_of(again)? == ttrpc::Code::FAILED_PRECONDITION, "second sandbox container");
    a.remove("pause")?;
    Ok(Outcome::Passed)
}

/// A member that shares the pod's PID namespace (CRI's shareProcessNamespace) is not PID
/// 1 of its own namespace, so the kernel does not end what its init started: the agent
/// must kill the rest when the init exits (as runc's shim does), or the background
/// process keeps the container's output open and the task "stopped" while it runs.
fn a_member_sharing_the_pods_pid_namespace_ends_with_its_init() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    a.create("pause", &spec(&root, &["sleep", "1000"]), StdioSpec::default(), true)?;
    a.start_container("pause")?;
    let root2 = a.rootfs()?;
    let mut member = spec(&root2, &["sh", "-c", "sleep 1000 & echo $!"]);
    member["linux"]["namespaces"] = json!([
        {"type": "pid", "path": "/proc/1/ns/pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}
    ]);
    a.create("app", &member, pipes(false), false)?;
    let out = a.attach("app", "", StreamKind::Stdout)?;
    out.set_read_timeout(Some(Duration::from_secs(30)))?;
    a.start_container("app")?;
    let status = a.wait("app", "")?;
    ensure_that!(status == 0, "the member's init exited {status}");
    // The background sleep inherited stdout: the stream ends only once it is dead.
    let text = read_stream(out).context("the member's stdout did not end: what its init started lives on")?;
    ensure_that!(text.trim().parse::<u32>().is_ok(), "the member printed {text:?}, want the background pid");
    let left =
        a.api().list_processes(Agent::ctx(), &ContainerRequest { container_id: "app".into(), ..Default::default() })?;
    ensure_that!(left.pids.is_empty(), "processes {:?} left in the member after its init exited", left.pids);
    // The pod's own init is untouched.
    let pause = a
        .api()
        .list_processes(Agent::ctx(), &ContainerRequest { container_id: "pause".into(), ..Default::default() })?;
    ensure_that!(!pause.pids.is_empty(), "the sandbox container was killed with the member");
    a.remove("app")?;
    a.remove("pause")?;
    a.check()?;
    Ok(Outcome::Passed)
}

fn bad_requests_leave_nothing_behind() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    let good = spec(&root, &["sleep", "1000"]);
    let invalid = |id: &str, body: Vec<u8>| -> anyhow::Result<(ttrpc::Code, String)> {
        let req = CreateContainerRequest { container_id: id.into(), oci_spec_json: body, ..Default::default() };
        let r = a.api().create_container(Agent::ctx(), &req);
        let msg = match &r {
            Err(ttrpc::Error::RpcStatus(s)) => s.message.clone(),
            _ => String::new(),
        };
        Ok((code_of(r)?, msg))
    };
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        serde_json::to_vec(&v).unwrap_or_default()
    };
    let cases: Vec<(&str, Vec<u8>, ttrpc::Code)> = vec![
        ("json", b"{this is not json".to_vec(), ttrpc::Code::INVALID_ARGUMENT),
        ("empty", Vec::new(), ttrpc::Code::INVALID_ARGUMENT),
        (
            "noroot",
            with(&|v| {
                v.as_object_mut().map(|m| m.remove("root"));
            }),
            ttrpc::Code::INVALID_ARGUMENT,
        ),
        ("missingroot", with(&|v| v["root"]["path"] = json!("/nonexistent/rootfs")), ttrpc::Code::INVALID_ARGUMENT),
        ("baduser", with(&|v| v["process"]["user"]["uid"] = json!(-5)), ttrpc::Code::INVALID_ARGUMENT),
        ("badns", with(&|v| v["linux"]["namespaces"][0]["type"] = json!("warp")), ttrpc::Code::INVALID_ARGUMENT),
        ("noargs", with(&|v| v["process"]["args"] = json!([])), ttrpc::Code::INVALID_ARGUMENT),
        (
            "badcap",
            with(&|v| v["process"]["capabilities"]["bounding"] = json!(["CAP_FLY"])),
            ttrpc::Code::INVALID_ARGUMENT,
        ),
        ("badcg", with(&|v| v["linux"]["cgroupsPath"] = json!("/../../escape")), ttrpc::Code::INVALID_ARGUMENT),
        ("huge", vec![b' '; 3 << 20], ttrpc::Code::INVALID_ARGUMENT),
        ("../evil", serde_json::to_vec(&good)?, ttrpc::Code::INVALID_ARGUMENT),
        ("", serde_json::to_vec(&good)?, ttrpc::Code::INVALID_ARGUMENT),
        ("nobinary", with(&|v| v["process"]["args"] = json!(["/no/such/binary"])), ttrpc::Code::FAILED_PRECONDITION),
        (
            "badmount",
            with(&|v| {
                v["mounts"] =
                    json!([{"destination": "/x", "type": "bind", "source": "/nonexistent/src", "options": ["bind"]}])
            }),
            ttrpc::Code::FAILED_PRECONDITION,
        ),
    ];
    for (id, body, want) in cases {
        let (got, msg) = invalid(id, body).with_context(|| format!("case {id:?}"))?;
        ensure_that!(got == want, "case {id:?}: got {got:?} ({msg}), want {want:?}");
        ensure_that!(!msg.is_empty(), "case {id:?}: empty error message");
        if !id.is_empty() && !id.contains('/') {
            ensure_that!(a.leftovers(id).is_empty(), "case {id:?} left {:?}", a.leftovers(id));
        }
    }
    // Wrong state and unknown ids.
    a.create("c1", &good, StdioSpec::default(), false)?;
    // Another container's cgroup is not joined, and not torn down by the failure.
    let mut steal = good.clone();
    steal["linux"]["cgroupsPath"] = json!(format!("{}/c1", a.cgroup_parent));
    ensure_that!(
        code_of(a.create("thief", &steal, StdioSpec::default(), false))? == ttrpc::Code::FAILED_PRECONDITION,
        "cgroup of c1 reused"
    );
    ensure_that!(a.leftovers("c1").len() == a.cgroup_dirs().len() + 2, "c1 damaged: {:?}", a.leftovers("c1"));
    ensure_that!(
        code_of(a.create("c1", &good, StdioSpec::default(), false))? == ttrpc::Code::ALREADY_EXISTS,
        "duplicate id"
    );
    ensure_that!(
        code_of(a.exec("c1", "e", &process(&["true"]), StdioSpec::default()))? == ttrpc::Code::FAILED_PRECONDITION,
        "exec before start"
    );
    a.start_container("c1")?;
    let twice =
        a.api().start_container(Agent::ctx(), &ContainerRequest { container_id: "c1".into(), ..Default::default() });
    ensure_that!(code_of(twice)? == ttrpc::Code::FAILED_PRECONDITION, "double start");
    let unknown = ContainerRequest { container_id: "ghost".into(), ..Default::default() };
    ensure_that!(code_of(a.api().start_container(Agent::ctx(), &unknown))? == ttrpc::Code::NOT_FOUND, "start unknown");
    ensure_that!(code_of(a.api().stats_container(Agent::ctx(), &unknown))? == ttrpc::Code::NOT_FOUND, "stats unknown");
    ensure_that!(code_of(a.signal("ghost", "", 9, false))? == ttrpc::Code::NOT_FOUND, "signal unknown");
    let bad_exec = a.api().exec_process(
        Agent::ctx(),
        &ExecProcessRequest {
            container_id: "c1".into(),
            exec_id: "e".into(),
            process_json: b"[1,2]".to_vec(),
            ..Default::default()
        },
    );
    ensure_that!(code_of(bad_exec)? == ttrpc::Code::INVALID_ARGUMENT, "malformed exec process");
    // Garbage on the stdio port is refused, the agent carries on.
    let mut s = UnixStream::connect(a.stdio_sock())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut ans = Vec::new();
    let _ = s.read_to_end(&mut ans);
    ensure_that!(ans.first() == Some(&1), "garbage stream answer {ans:?}");
    let mut s = UnixStream::connect(a.stdio_sock())?;
    StreamHeader { container_id: "ghost".into(), exec_id: String::new(), stream: StreamKind::Stdout }
        .write_to(&mut s)?;
    let mut ans = Vec::new();
    let _ = s.read_to_end(&mut ans);
    ensure_that!(ans.first() == Some(&1), "unknown container stream answer {ans:?}");
    a.remove("c1")?;
    ensure_that!(a.leftovers("c1").is_empty(), "c1 left {:?}", a.leftovers("c1"));
    ensure_that!(
        code_of(a.api().remove_container(
            Agent::ctx(),
            &RemoveContainerRequest { container_id: "c1".into(), ..Default::default() }
        ))? == ttrpc::Code::NOT_FOUND,
        "remove twice"
    );
    // After all of it, the agent still answers and still runs containers.
    a.check()?;
    let (st, out, _) = run_to_end(&a, "after", &spec(&root, &["echo", "still here"]))?;
    ensure_that!(st == 0 && out == "still here\n", "container after bad requests: {st} {out:?}");
    Ok(Outcome::Passed)
}

fn destroy_sandbox_cleans_up() -> CaseResult {
    let mut a = setup!();
    let root = a.rootfs()?;
    a.create("d1", &spec(&root, &["sleep", "1000"]), StdioSpec::default(), true)?;
    a.start_container("d1")?;
    let root2 = a.rootfs()?;
    a.create("d2", &spec(&root2, &["sleep", "1000"]), StdioSpec::default(), false)?;
    a.api().destroy_sandbox(Agent::ctx(), &Empty::new())?;
    let mut child = a.child.take().context("agent process")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("agent did not exit after DestroySandbox");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    ensure_that!(status.success(), "agent exit status {status}");
    for id in ["d1", "d2"] {
        ensure_that!(a.leftovers(id).is_empty(), "{id} left {:?}", a.leftovers(id));
    }
    Ok(Outcome::Passed)
}

fn main() {
    Suite::new("agent_host")
        .case("exit_codes", exit_codes)
        .case("output_is_complete_on_immediate_exit", output_is_complete_on_immediate_exit)
        .case("stdin_is_piped_with_eof", stdin_is_piped_with_eof)
        .case("exec_into_running_container", exec_into_running_container)
        .case("signals_map_to_runc_statuses", signals_map_to_runc_statuses)
        .case("tty_and_resize", tty_and_resize)
        .case("user_and_groups", user_and_groups)
        .case("read_only_rootfs_and_env_cwd", read_only_rootfs_and_env_cwd)
        .case("seccomp_applies_to_init_and_execs", seccomp_applies_to_init_and_execs)
        .case("oom_kill_is_reported", oom_kill_is_reported)
        .case("stats_and_process_list", stats_and_process_list)
        .case("pause_resume_and_update", pause_resume_and_update)
        .case("pod_shares_ipc_and_uts", pod_shares_ipc_and_uts)
        .case(
            "a_member_sharing_the_pods_pid_namespace_ends_with_its_init",
            a_member_sharing_the_pods_pid_namespace_ends_with_its_init,
        )
        .case("bad_requests_leave_nothing_behind", bad_requests_leave_nothing_behind)
        .case("destroy_sandbox_cleans_up", destroy_sandbox_cleans_up)
        .run()
}
