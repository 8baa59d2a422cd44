//! wisp-agent: PID 1 of the pod's micro-VM (or, in host test mode, its services on Unix
//! sockets). The modes, the command line and the services are the `wisp_agent`
//! library's (`lib.rs`).

use wisp_agent::boot_marker::{self, BootMarker};
use wisp_agent::{guest, logger, parse_args, run, Command, USAGE};
use wisp_protocols::AGENT_API_VERSION;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(Command::Version) => {
            println!("wisp-agent {} (agent API {AGENT_API_VERSION})", env!("CARGO_PKG_VERSION"));
            return;
        }
        Ok(Command::Run(o)) => o,
        Err(e) => {
            eprintln!("wisp-agent: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let guest = opts.guest();
    if guest {
        if nix::unistd::getpid().as_raw() != 1 {
            eprintln!("wisp-agent: not PID 1; for host test mode give --listen and --stdio-listen\n{USAGE}");
            std::process::exit(2);
        }
        boot_marker::write(BootMarker::UserspaceStarted);
    }
    logger::init();
    if let Err(e) = run(opts) {
        log::error!("fatal: {e:#}");
        if guest {
            guest::reboot();
        }
        std::process::exit(1);
    }
}
