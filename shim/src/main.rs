//! containerd-shim-wisp-v2: containerd's shim v2 for wisp. containerd starts it for the
//! runtime type `io.containerd.wisp.v2`; it runs each pod in its own micro-VM.

mod agent;
mod bounds;
mod cgroup;
mod cleanup;
mod container;
mod events;
mod hooks;
mod hostfs;
mod info;
mod io;
mod logger;
mod metrics;
mod mounts;
mod network;
mod options;
mod sandbox;
mod service;
mod share;
mod shim;
mod spawn;
mod spec;
mod vm;

fn main() {
    // containerd 2.x asks `-info` (a RuntimeInfo on stdout) outside the shim protocol.
    if std::env::args().nth(1).as_deref() == Some("-info") {
        info::run();
    }
    let config = containerd_shim::Config {
        // The shim waits for each child it starts itself (the VMM, hooks, logging
        // programs): no reaper thread may take their exit statuses.
        no_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<shim::WispShim>(shim::RUNTIME_ID, Some(config));
}
