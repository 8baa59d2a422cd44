//! containerd-shim-wisp-v2: containerd's shim v2 for wisp. containerd starts it for the
//! runtime type `io.containerd.wisp.v2`; it runs each pod in its own micro-VM. The
//! modules are the `wisp_shim` library's (`lib.rs`).

use wisp_shim::{info, mountns, shim};

fn main() {
    // containerd 2.x asks `-info` (a RuntimeInfo on stdout) outside the shim protocol.
    if std::env::args().nth(1).as_deref() == Some("-info") {
        info::run();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if mountns::is_serving(&args) {
        if let Err(e) = mountns::enter_own() {
            eprintln!("containerd-shim-wisp-v2: {e}");
            std::process::exit(1);
        }
    }
    let config = containerd_shim::Config {
        // The shim waits for each child it starts itself (the VMM, hooks, logging
        // programs): no reaper thread may take their exit statuses.
        no_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<shim::WispShim>(shim::RUNTIME_ID, Some(config));
}
