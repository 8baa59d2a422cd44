//! `wisp-vmm`: start one micro-VM and run it until the guest reboots or powers off.
//! Exit status 0 when the guest ends it; otherwise non-zero with a one-line reason.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use wisp_vmm::builder::{CacheMode, SharedDirConfig};
use wisp_vmm::devices::virtio::fs::{validate_tag, MAX_REQUEST_QUEUES};
use wisp_vmm::{ConsoleOutput, DiskConfig, MicroVm, VmConfig, VmExit, VsockConfig};

#[derive(Parser, Debug)]
#[command(name = "wisp-vmm", version, about = "wisp's micro-VM monitor: boots a Linux guest on KVM with virtio-mmio devices")]
struct Args {
    /// Guest kernel: uncompressed vmlinux (ELF, PVH entry preferred) or bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initial ramdisk (cpio, optionally compressed).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Extra kernel command line, appended to what the VMM sets (console, devices).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    cmdline: String,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    #[arg(long = "memory-mib", default_value_t = 128)]
    memory_mib: u64,
    /// Guest console: off (default; every byte printed costs a VM exit), stdout, or a file path.
    #[arg(long, default_value = "off")]
    console: String,
    /// Host Unix socket for the hybrid vsock device (hosts connect and send `CONNECT <port>\n`).
    #[arg(long = "vsock-uds")]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock context ID.
    #[arg(long = "vsock-cid", default_value_t = 3)]
    vsock_cid: u64,
    /// A raw disk image as virtio-blk; `PATH,ro` for read-only. Repeatable.
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// A host directory shared over virtio-fs: `TAG=PATH[,ro][,cache=never|auto|always][,queues=N][,xattr]`;
    /// the guest mounts it with `mount -t virtiofs TAG DIR`. Repeatable, one device each.
    #[arg(long = "shared-dir")]
    shared_dirs: Vec<String>,
    /// Disable the virtio-rng entropy device.
    #[arg(long = "no-rng")]
    no_rng: bool,
    /// Control API socket (ttrpc): state, pause, resume, shutdown, boot timeline.
    #[arg(long = "api-sock")]
    api_sock: Option<PathBuf>,
    /// Log level: error, warn, info, debug, trace (also WISP_LOG).
    #[arg(long = "log-level")]
    log_level: Option<String>,
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let (path, ro) = match s.rsplit_once(',') {
        Some((p, "ro")) => (p, true),
        Some((p, "rw")) => (p, false),
        Some((_, opt)) => return Err(format!("--disk {s}: unknown option '{opt}' (use PATH or PATH,ro)")),
        None => (s, false),
    };
    if path.is_empty() {
        return Err(format!("--disk {s}: empty path"));
    }
    Ok(DiskConfig { path: path.into(), read_only: ro })
}

const SHARED_DIR_SYNTAX: &str = "TAG=PATH[,ro][,cache=never|auto|always][,queues=N][,xattr]";

fn parse_shared_dir(s: &str) -> Result<SharedDirConfig, String> {
    let err = |what: String| format!("--shared-dir {s}: {what}");
    let Some((tag, rest)) = s.split_once('=') else {
        return Err(err(format!("expected {SHARED_DIR_SYNTAX}")));
    };
    validate_tag(tag).map_err(|e| err(e.to_string()))?;
    let mut parts = rest.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(err(format!("missing path (expected {SHARED_DIR_SYNTAX})")));
    }
    let mut dir = SharedDirConfig::new(tag, path);
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => dir.read_only = true,
            None if opt == "rw" => dir.read_only = false,
            None if opt == "xattr" => dir.xattr = true,
            Some(("cache", mode)) => dir.cache = mode.parse::<CacheMode>().map_err(|e| err(e.to_string()))?,
            Some(("queues", n)) => {
                dir.request_queues = n
                    .parse::<u16>()
                    .ok()
                    .filter(|n| (1..=MAX_REQUEST_QUEUES).contains(n))
                    .ok_or_else(|| err(format!("queues={n}: use 1 to {MAX_REQUEST_QUEUES}")))?;
            }
            _ => return Err(err(format!("unknown option '{opt}' (expected {SHARED_DIR_SYNTAX})"))),
        }
    }
    dir.validate().map_err(|e| err(e.to_string()))?;
    Ok(dir)
}

fn config_from(args: &Args) -> Result<VmConfig, String> {
    let console = match args.console.as_str() {
        "off" => ConsoleOutput::Off,
        "stdout" => ConsoleOutput::Stdout,
        "" => return Err("--console: empty value (use off, stdout or a file path)".into()),
        p => ConsoleOutput::File(p.into()),
    };
    let disks = args.disks.iter().map(|d| parse_disk(d)).collect::<Result<Vec<_>, _>>()?;
    let shared_dirs = args.shared_dirs.iter().map(|d| parse_shared_dir(d)).collect::<Result<Vec<_>, _>>()?;
    for (i, dir) in shared_dirs.iter().enumerate() {
        if shared_dirs[..i].iter().any(|d| d.tag == dir.tag) {
            return Err(format!("--shared-dir: tag '{}' is used twice; each share needs its own tag", dir.tag));
        }
    }
    if args.vsock_cid < 3 || args.vsock_cid > u64::from(u32::MAX) - 1 {
        return Err(format!("--vsock-cid {}: guest CIDs are 3..4294967294", args.vsock_cid));
    }
    Ok(VmConfig {
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        extra_cmdline: args.cmdline.clone(),
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        console,
        vsock: args.vsock_uds.clone().map(|uds_path| VsockConfig { guest_cid: args.vsock_cid, uds_path }),
        disks,
        shared_dirs,
        rng: !args.no_rng,
    })
}

/// SIGTERM, SIGINT and SIGHUP end the VM cleanly: they are blocked in every thread and
/// collected by one thread with sigwait.
fn forward_stop_signals(exits: std::sync::mpsc::Sender<VmExit>) -> std::io::Result<()> {
    // SAFETY: plain libc signal-set manipulation on local, initialized sets.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        std::thread::Builder::new().name("signals".into()).spawn(move || loop {
            let mut sig: libc::c_int = 0;
            if libc::sigwait(&set, &mut sig) == 0 {
                let _ = exits.send(VmExit::Stopped(format!("signal {sig}")));
            }
        })?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let start = Instant::now();
    let args = Args::parse();
    let level = args
        .log_level
        .clone()
        .or_else(|| std::env::var("WISP_LOG").ok())
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Warn);
    wisp_vmm::logger::init(level, start);

    let config = match config_from(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wisp-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<VmExit>();
    if let Err(e) = forward_stop_signals(stop_tx) {
        eprintln!("wisp-vmm: cannot set up signal handling: {e}");
        return ExitCode::from(1);
    }
    let vm = match MicroVm::start(&config, start) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("wisp-vmm: {e}");
            cleanup(&config, &args);
            return ExitCode::from(1);
        }
    };
    let exits = vm.exit_sender();
    std::thread::spawn(move || {
        if let Ok(e) = stop_rx.recv() {
            let _ = exits.send(e);
        }
    });
    let api = match &args.api_sock {
        Some(path) => match wisp_vmm::api::serve(path, vm.control()) {
            Ok(server) => Some(server),
            Err(e) => {
                eprintln!("wisp-vmm: control API on {}: {e}", path.display());
                cleanup(&config, &args);
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let exit = vm.wait();
    drop(api);
    cleanup(&config, &args);
    match &exit {
        VmExit::Error(msg) => eprintln!("wisp-vmm: {msg}"),
        other => log::info!("VM ended: {other:?}"),
    }
    ExitCode::from(exit.exit_code() as u8)
}

fn cleanup(config: &VmConfig, args: &Args) {
    if let Some(v) = &config.vsock {
        let _ = std::fs::remove_file(&v.uds_path);
    }
    if let Some(p) = &args.api_sock {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_option_parsing() {
        assert_eq!(parse_disk("/a.img").unwrap(), DiskConfig { path: "/a.img".into(), read_only: false });
        assert_eq!(parse_disk("/a.img,ro").unwrap(), DiskConfig { path: "/a.img".into(), read_only: true });
        assert!(parse_disk("/a.img,bogus").unwrap_err().contains("bogus"));
        assert!(parse_disk(",ro").is_err());
    }

    #[test]
    fn shared_dir_option_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().display().to_string();
        let d = parse_shared_dir(&format!("rootfs={p}")).unwrap();
        assert_eq!(d, SharedDirConfig::new("rootfs", dir.path()));
        assert_eq!(d.cache, CacheMode::Auto);
        assert_eq!((d.read_only, d.request_queues, d.xattr), (false, 1, false));
        let d = parse_shared_dir(&format!("vol={p},ro,cache=never,queues=2,xattr")).unwrap();
        assert_eq!((d.read_only, d.cache, d.request_queues, d.xattr), (true, CacheMode::Never, 2, true));
        assert_eq!(parse_shared_dir(&format!("t={p},cache=always")).unwrap().cache, CacheMode::Always);

        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let long = "x".repeat(37);
        let cases = [
            (format!("={p}"), "empty"),
            (format!("{long}={p}"), "longer than 36"),
            (format!("a,b={p}"), "contains ','"),
            (format!("a b={p}"), "contains ' '"),
            (p.clone(), "expected TAG=PATH"),
            ("t=".to_string(), "missing path"),
            ("t=,ro".to_string(), "missing path"),
            (format!("t={}", file.display()), "not a directory"),
            (format!("t={p}/missing"), "No such file"),
            (format!("t={p},bogus"), "unknown option 'bogus'"),
            (format!("t={p},ro=1"), "unknown option 'ro=1'"),
            (format!("t={p},cache=metadata"), "unknown virtio-fs cache mode 'metadata'"),
            (format!("t={p},queues=0"), "queues=0"),
            (format!("t={p},queues=17"), "queues=17"),
            (format!("t={p},queues=x"), "queues=x"),
        ];
        for (arg, want) in cases {
            let e = parse_shared_dir(&arg).unwrap_err();
            assert!(e.contains(want), "{arg}: {e}");
            assert!(e.starts_with("--shared-dir "), "{arg}: {e}");
            assert_eq!(e.lines().count(), 1, "{arg}: {e}");
        }
        // A tag with '=' cannot be written: the first '=' ends the tag and the rest is the path.
        assert!(parse_shared_dir(&format!("a=b={p}")).unwrap_err().contains("a=b="));

        let mut a = Args::parse_from(["wisp-vmm", "--kernel", "k", "--shared-dir", &format!("t={p}")]);
        assert_eq!(config_from(&a).unwrap().shared_dirs.len(), 1);
        a.shared_dirs.push(format!("t={p},ro"));
        assert!(config_from(&a).unwrap_err().contains("tag 't' is used twice"));
    }

    #[test]
    fn bad_console_and_cid_are_refused() {
        let mut a = Args::parse_from(["wisp-vmm", "--kernel", "k"]);
        assert_eq!(config_from(&a).unwrap().console, ConsoleOutput::Off);
        a.vsock_cid = 2;
        assert!(config_from(&a).unwrap_err().contains("vsock-cid"));
        a.vsock_cid = 3;
        a.console = String::new();
        assert!(config_from(&a).is_err());
    }
}
