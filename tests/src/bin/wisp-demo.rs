//! wisp-demo: what `make demo` runs once wisp is installed. It starts a private
//! containerd (the installed shim on PATH, /etc/wisp/config.toml), imports a busybox
//! image built locally, and runs
//! `ctr run --rm --runtime io.containerd.wisp.v2 <busybox> wisp-demo uname -a`
//! so the container prints the kernel of its micro-VM.

use std::process::Stdio;

use wisp_tests::containerd::{Containerd, NAMESPACE};

fn main() {
    if let Err(e) = run() {
        eprintln!("wisp-demo: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let c = Containerd::start_installed()?;
    let image = c.import_busybox()?;
    let host = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!("host kernel:  {}", host.trim());
    println!(
        "$ ctr --namespace {NAMESPACE} run --rm --runtime io.containerd.wisp.v2 {image} wisp-demo uname -a"
    );
    let status = c
        .ctr(&["run", "--rm", "--runtime", "io.containerd.wisp.v2", &image, "wisp-demo", "uname", "-a"])
        .stdin(Stdio::null())
        .status()?;
    if !status.success() {
        anyhow::bail!("ctr run failed ({status}); containerd log:\n{}", c.log());
    }
    Ok(())
}
