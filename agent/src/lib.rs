//! wisp-agent: PID 1 of the pod's micro-VM. It prepares the guest (init), serves the
//! agent API (ttrpc, vsock port 1024) and stdio streams (vsock port 1025), and runs the
//! pod's containers with libcontainer. This library holds its modules, its command line
//! and its services (`run`); the binary (`main.rs`) is `main`. wisp's tests use it too
//! (the shared filesystem's read-ahead, `guest`), and its fuzz target drives the checks
//! of what the shim sends (`spec`, `network::check_*`); only what those and the binary
//! need is public.
//!
//! Modes:
//! - guest (no flags, PID 1): init duties, vsock listeners, DestroySandbox reboots.
//! - host test mode (`--listen unix:PATH --stdio-listen unix:PATH [--state-dir DIR]
//!   [--cgroup-parent /NAME]`): the same services on Unix sockets, as a child
//!   subreaper, with nothing machine-wide touched; integration tests run real
//!   containers this way without a VM.
//!
//! Trusts: its command line (given by the kernel or a test harness).

pub mod boot_marker;
mod cgroup;
mod container;
mod engine;
pub mod guest;
mod init;
mod listener;
pub mod logger;
pub mod network;
mod oom;
mod process;
mod reaper;
mod sandbox;
mod server;
mod spawn;
pub mod spec;
mod stats;
mod stdio;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context;
use wisp_protocols::{AGENT_STDIO_PORT, AGENT_TTRPC_PORT};

use crate::boot_marker::BootMarker;
use crate::listener::{ListenAddr, StreamListener};
use crate::oom::ContainerSource;
use crate::reaper::Reaper;
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::server::AgentService;

pub const USAGE: &str = "usage: wisp-agent [--version]
       wisp-agent                     (as PID 1 of the guest: vsock ports 1024/1025)
       wisp-agent --listen unix:PATH --stdio-listen unix:PATH [--state-dir DIR] [--cgroup-parent /NAME]
                                      (host test mode)";

/// What `Command::Run` runs (see the crate's modes).
#[derive(Debug, PartialEq, Eq)]
pub struct Options {
    /// None in guest mode.
    listen: Option<ListenAddr>,
    stdio_listen: Option<ListenAddr>,
    state_dir: PathBuf,
    cgroup_parent: PathBuf,
}

impl Options {
    /// Guest mode (PID 1 of the VM, vsock), not host test mode.
    pub fn guest(&self) -> bool {
        self.listen.is_none()
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Version,
    Run(Options),
}

/// The command line (without the program name), or what is wrong with it.
pub fn parse_args(args: &[String]) -> Result<Command, String> {
    let mut o = Options {
        listen: None,
        stdio_listen: None,
        state_dir: PathBuf::from("/run/wisp-agent"),
        cgroup_parent: PathBuf::from("/wisp"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--version" | "-V" => return Ok(Command::Version),
            "--listen" => o.listen = Some(ListenAddr::parse(&value("--listen")?).map_err(|e| e.to_string())?),
            "--stdio-listen" => {
                o.stdio_listen = Some(ListenAddr::parse(&value("--stdio-listen")?).map_err(|e| e.to_string())?)
            }
            "--state-dir" => o.state_dir = PathBuf::from(value("--state-dir")?),
            "--cgroup-parent" => o.cgroup_parent = PathBuf::from(value("--cgroup-parent")?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.listen.is_some() != o.stdio_listen.is_some() {
        return Err("--listen and --stdio-listen go together".into());
    }
    if !o.state_dir.is_absolute() || !o.cgroup_parent.is_absolute() {
        return Err("--state-dir and --cgroup-parent must be absolute".into());
    }
    Ok(Command::Run(o))
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Runs the agent's services until DestroySandbox (guest mode: the guest reboots) or,
/// in host test mode, SIGTERM/SIGINT.
pub fn run(o: Options) -> anyhow::Result<()> {
    let guest = o.guest();
    if guest {
        init::leave_initramfs().context("leaving the initramfs")?;
        init::setup_guest().context("preparing the guest")?;
    } else {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            anyhow::bail!("cannot become a child subreaper: {}", std::io::Error::last_os_error());
        }
        let handler = nix::sys::signal::SigHandler::Handler(on_stop_signal);
        for sig in [nix::sys::signal::Signal::SIGTERM, nix::sys::signal::Signal::SIGINT] {
            // SAFETY: the handler only stores to an atomic.
            unsafe { nix::sys::signal::signal(sig, handler) }.context("installing signal handlers")?;
        }
    }
    std::env::set_current_dir("/").context("chdir /")?;
    let ttrpc_addr = o.listen.clone().unwrap_or(ListenAddr::Vsock(AGENT_TTRPC_PORT));
    let stdio_addr = o.stdio_listen.clone().unwrap_or(ListenAddr::Vsock(AGENT_STDIO_PORT));

    let reaper = Reaper::new();
    reaper.start().context("starting the reaper")?;
    let cfg = SandboxConfig { guest, state_dir: o.state_dir.clone(), cgroup_parent: o.cgroup_parent.clone() };
    let sandbox = Sandbox::new(cfg, reaper).map_err(|e| anyhow::anyhow!("{e}"))?;
    let source: Weak<dyn ContainerSource> = Arc::downgrade(&sandbox) as Weak<dyn ContainerSource>;
    oom::start_monitor(sandbox.oom.clone(), source).context("starting the OOM monitor")?;

    let stdio_listener = StreamListener::bind(&stdio_addr)?;
    let lookup = sandbox.clone();
    std::thread::Builder::new()
        .name("stdio-accept".into())
        .spawn(move || stdio::serve(stdio_listener, lookup))
        .context("starting the stdio listener")?;

    let after_destroy: Arc<dyn Fn() + Send + Sync> =
        if guest { Arc::new(|| guest::reboot()) } else { Arc::new(|| STOP.store(true, Ordering::SeqCst)) };
    let service = AgentService::new(sandbox.clone(), after_destroy);
    let methods = wisp_protocols::agent_ttrpc::create_agent(Arc::new(service));
    ttrpc_addr.remove_stale();
    let mut server = ttrpc::Server::new()
        .bind(&ttrpc_addr.ttrpc_uri())
        .with_context(|| format!("binding the agent API on {ttrpc_addr:?}"))?
        .register_service(methods)
        // Long polls (WaitProcess per live process, GetOomEvent) each hold a worker for
        // as long as they wait; ttrpc's default of at most 5 workers per connection
        // left no worker for ordinary calls once a pod had a few processes.
        .set_thread_count_min(2)
        .set_thread_count_default(8)
        .set_thread_count_max(1024);
    server.start().context("starting the agent API")?;
    if guest {
        boot_marker::write(BootMarker::AgentListening);
    }
    log::info!("wisp-agent {} listening: api {:?}, stdio {:?}", env!("CARGO_PKG_VERSION"), ttrpc_addr, stdio_addr);

    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
    log::info!("stopping: removing all containers");
    sandbox.destroy();
    ttrpc_addr.remove_stale();
    stdio_addr.remove_stale();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn command_line() {
        assert_eq!(parse_args(&args("--version")).unwrap(), Command::Version);
        let Command::Run(o) = parse_args(&args("")).unwrap() else { panic!() };
        assert!(o.listen.is_none());
        let Command::Run(o) = parse_args(&args(
            "--listen unix:/t/a.sock --stdio-listen unix:/t/s.sock --state-dir /t/st --cgroup-parent /x",
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!(o.listen, Some(ListenAddr::Unix("/t/a.sock".into())));
        assert_eq!(o.state_dir, PathBuf::from("/t/st"));
        assert_eq!(o.cgroup_parent, PathBuf::from("/x"));
        assert!(parse_args(&args("--listen unix:/a")).is_err());
        assert!(parse_args(&args("--bogus")).is_err());
        assert!(parse_args(&args("--state-dir rel --listen unix:/a --stdio-listen unix:/b")).is_err());
        assert!(parse_args(&args("--listen")).is_err());
    }
}
