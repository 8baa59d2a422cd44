//! `wisp-vmm`: start one micro-VM and run it until the guest ends it (reboot, power-off
//! or triple fault) or the VMM is told to stop (signal, control API). Exit status 0 for
//! those ends (`VmExit::exit_code`); 1 with a one-line reason when the VM cannot start
//! or fails, 2 for bad arguments.

use std::os::fd::RawFd;
use std::process::ExitCode;
use std::time::Instant;

mod cli;

use cli::Args;
use wisp_vmm::builder::{CacheMode, NetBackend, NetConfig, SharedDirConfig};
use wisp_vmm::devices::virtio::fs::{validate_tag, MAX_REQUEST_QUEUES};
use wisp_vmm::devices::virtio::net::{valid_ifname, MacAddr, MAX_IFNAME_LEN, MIN_MTU};
use wisp_vmm::jail::{Bind, BindKind, JailConfig};
use wisp_vmm::seccomp::ThreadKind;
use wisp_vmm::{ConsoleOutput, DiskConfig, MicroVm, VmConfig, VmExit, VsockConfig};

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

use cli::SHARED_DIR_SYNTAX;

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
            Some((key @ ("max-inodes" | "max-handles"), n)) => {
                let n = n
                    .parse::<u32>()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| err(format!("{key}={n}: use 1 to {}", u32::MAX)))?;
                if key == "max-inodes" {
                    dir.max_inodes = n;
                } else {
                    dir.max_handles = n;
                }
            }
            _ => return Err(err(format!("unknown option '{opt}' (expected {SHARED_DIR_SYNTAX})"))),
        }
    }
    dir.validate().map_err(|e| err(e.to_string()))?;
    Ok(dir)
}

const NET_SYNTAX: &str = "fd=N,mac=AA:BB:CC:DD:EE:FF[,mtu=M] or tap=NAME,mac=AA:BB:CC:DD:EE:FF[,mtu=M]";

fn parse_net(s: &str) -> Result<NetConfig, String> {
    let err = |what: String| format!("--net {s}: {what}");
    let (mut backend, mut mac, mut mtu) = (None, None, None);
    for part in s.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            return Err(err(format!("'{part}' is not KEY=VALUE (expected {NET_SYNTAX})")));
        };
        match key {
            "fd" | "tap" if backend.is_some() => return Err(err(format!("'{part}': give one fd= or tap=, once"))),
            "fd" => {
                let fd = value
                    .parse::<u32>()
                    .ok()
                    .and_then(|fd| RawFd::try_from(fd).ok())
                    .ok_or_else(|| err(format!("fd={value}: not a descriptor number")))?;
                if fd <= 2 {
                    return Err(err(format!("fd={value}: descriptors 0 to 2 are stdin, stdout and stderr, not a tap")));
                }
                backend = Some(NetBackend::Fd(fd));
            }
            "tap" => {
                if !valid_ifname(value) {
                    return Err(err(format!(
                        "tap={value}: not an interface name (1 to {MAX_IFNAME_LEN} bytes, no '/', ':' or whitespace)"
                    )));
                }
                backend = Some(NetBackend::Name(value.to_string()));
            }
            "mac" if mac.is_some() => return Err(err("mac= is given twice".into())),
            "mac" => mac = Some(MacAddr::parse(value).map_err(|e| err(format!("mac: {e}")))?),
            "mtu" if mtu.is_some() => return Err(err("mtu= is given twice".into())),
            "mtu" => {
                let m = value.parse::<u16>().ok().filter(|&m| m >= MIN_MTU);
                mtu = Some(m.ok_or_else(|| err(format!("mtu={value}: use {MIN_MTU} to 65535")))?);
            }
            _ => return Err(err(format!("unknown option '{part}' (expected {NET_SYNTAX})"))),
        }
    }
    let backend = backend.ok_or_else(|| err(format!("no tap given (expected {NET_SYNTAX})")))?;
    let mac = mac.ok_or_else(|| err(format!("no mac= given (expected {NET_SYNTAX})")))?;
    Ok(NetConfig { backend, mac: mac.0, mtu })
}

/// Every `--net fd=N` descriptor must have been passed to us open: checked before the
/// VMM opens anything itself, so a missing one is reported as such.
fn check_inherited_fds(nets: &[NetConfig]) -> Result<(), String> {
    for n in nets {
        if let NetBackend::Fd(fd) = n.backend {
            // SAFETY: F_GETFD only reads the descriptor flags; an unused number fails.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(format!(
                    "--net fd={fd}: descriptor {fd} is not open in wisp-vmm (the caller must pass the tap descriptor inherited)"
                ));
            }
        }
    }
    Ok(())
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
    let nets = args.nets.iter().map(|n| parse_net(n)).collect::<Result<Vec<_>, _>>()?;
    for (i, net) in nets.iter().enumerate() {
        if nets[..i].iter().any(|n| n.backend == net.backend) {
            let which = match &net.backend {
                NetBackend::Fd(fd) => format!("fd={fd}"),
                NetBackend::Name(name) => format!("tap={name}"),
            };
            return Err(format!("--net: {which} is used twice; each device needs its own tap"));
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
        nets,
    })
}

/// The jail for `--jail DIR`: every path the VM's configuration names, bound at its
/// own path, and /dev/kvm.
fn jail_from(root: &std::path::Path, config: &VmConfig, args: &Args) -> Result<JailConfig, String> {
    use std::path::Path;
    let mut binds: Vec<Bind> = Vec::new();
    let mut add = |path: &Path, kind: BindKind| {
        if !binds.iter().any(|b| b.path == path) {
            binds.push(Bind { path: path.to_path_buf(), kind });
        }
    };
    add(Path::new("/dev/kvm"), BindKind::Device);
    match &args.restore {
        // A snapshot's files instead of the boot images: read only (its memory is
        // mapped copy-on-write).
        Some((state, memory)) => {
            add(state, BindKind::FileRo);
            add(memory, BindKind::FileRo);
        }
        None => {
            add(&config.kernel, BindKind::FileRo);
            if let Some(i) = &config.initrd {
                add(i, BindKind::FileRo);
            }
        }
    }
    for d in &config.disks {
        add(&d.path, BindKind::Disk { ro: d.read_only });
    }
    for s in &config.shared_dirs {
        add(&s.path, BindKind::Share { ro: s.read_only });
    }
    let parent = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut sockets: Vec<std::path::PathBuf> = Vec::new();
    if let Some(v) = &config.vsock {
        sockets.push(parent(&v.uds_path));
    }
    if let Some(a) = &args.api_sock {
        sockets.push(parent(a));
    }
    if let ConsoleOutput::File(f) = &config.console {
        sockets.push(parent(f));
    }
    for s in sockets {
        add(&s, BindKind::SocketDir);
    }
    if config.nets.iter().any(|n| matches!(n.backend, NetBackend::Name(_))) {
        return Err(
            "--jail: a tap must be passed as --net fd=N (the jailed VMM has a network namespace of its own)".into()
        );
    }
    let jail = JailConfig { root: root.to_path_buf(), binds };
    jail.validate().map_err(|e| e.to_string())?;
    Ok(jail)
}

/// SIGTERM, SIGINT and SIGHUP end the VM cleanly: blocked here, before any thread
/// starts (every thread inherits the mask), and collected by one thread with sigwait
/// (`collect_stop_signals`).
fn block_stop_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: plain libc signal-set manipulation on a local, initialized set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(set)
    }
}

fn collect_stop_signals(set: libc::sigset_t, exits: std::sync::mpsc::Sender<VmExit>) -> std::io::Result<()> {
    std::thread::Builder::new().name("signals".into()).spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: sigwait on the set blocked in every thread.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            let _ = exits.send(VmExit::Stopped(format!("signal {sig}")));
        }
    })?;
    Ok(())
}

fn main() -> ExitCode {
    let start = Instant::now();
    let args = match cli::parse(std::env::args_os().skip(1)) {
        Ok(cli::Command::Run(args)) => args,
        Ok(cli::Command::Help) => {
            print!("{}", cli::help());
            return ExitCode::SUCCESS;
        }
        Ok(cli::Command::Version) => {
            println!("wisp-vmm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("wisp-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    let level = args
        .log_level
        .clone()
        .or_else(|| std::env::var("WISP_LOG").ok())
        .and_then(|l| l.parse().ok())
        .unwrap_or(log::LevelFilter::Warn);
    wisp_vmm::logger::init(level, start);
    wisp_vmm::panics::install_hook();

    let config = match config_from(&args).and_then(|c| check_inherited_fds(&c.nets).map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wisp-vmm: {e}");
            return ExitCode::from(2);
        }
    };
    // The jail first: before a thread starts and before anything of the VM is opened.
    if let Some(root) = &args.jail {
        let entered = jail_from(root, &config, &args).and_then(|j| j.enter().map_err(|e| e.to_string()));
        if let Err(e) = entered.and_then(|()| wisp_vmm::jail::harden().map_err(|e| e.to_string())) {
            eprintln!("wisp-vmm: {e}");
            return ExitCode::from(1);
        }
        log::info!("jailed in {}", root.display());
    }
    let stop_signals = match block_stop_signals() {
        Ok(set) => set,
        Err(e) => {
            eprintln!("wisp-vmm: cannot set up signal handling: {e}");
            return ExitCode::from(1);
        }
    };
    wisp_vmm::seccomp::set_enabled(!args.no_seccomp);
    if args.no_seccomp {
        log::warn!("--no-seccomp: no thread of this VMM has a seccomp filter");
    }
    let started = match &args.restore {
        None => MicroVm::start(&config, start),
        Some((state, memory)) => match wisp_vmm::snapshot::microvm::open(state, memory) {
            Ok(restore) => MicroVm::restore(&config, restore, start),
            Err(e) => {
                eprintln!("wisp-vmm: {e}");
                cleanup(&config, &args);
                return ExitCode::from(1);
            }
        },
    };
    let vm = match started {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("wisp-vmm: {e}");
            cleanup(&config, &args);
            return ExitCode::from(1);
        }
    };
    // The vCPU and device threads run with their own filters now; this thread and every
    // thread it starts from here on (signals, the control API's) get the control list.
    if let Err(e) = wisp_vmm::seccomp::install_if_enabled(ThreadKind::Control) {
        eprintln!("wisp-vmm: {e}");
        cleanup(&config, &args);
        return ExitCode::from(1);
    }
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<VmExit>();
    if let Err(e) = collect_stop_signals(stop_signals, stop_tx) {
        eprintln!("wisp-vmm: cannot set up signal handling: {e}");
        cleanup(&config, &args);
        return ExitCode::from(1);
    }
    if let Some((kind, after)) = args.seccomp_selftest {
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(after));
            wisp_vmm::seccomp::arm_selftest(kind);
            wisp_vmm::seccomp::selftest_point(ThreadKind::Control);
        });
    }
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
    match (&exit, exit.failure()) {
        (_, Some(reason)) => eprintln!("wisp-vmm: {reason}"),
        // Exit status 0 like a reboot, but the guest did not ask for it: worth a warning.
        (VmExit::GuestTripleFault(_), None) => log::warn!("VM ended: {exit:?}"),
        (other, None) => log::info!("VM ended: {other:?}"),
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
    fn the_jail_binds_what_the_options_name_and_refuses_named_taps() {
        let d = tempfile::tempdir().unwrap();
        let (jail, share) = (d.path().join("jail"), d.path().join("shared"));
        std::fs::create_dir(&jail).unwrap();
        std::fs::create_dir(&share).unwrap();
        let mut args = Args::new("/boot/vmlinux");
        args.initrd = Some("/boot/initrd.img".into());
        args.vsock_uds = Some("/run/w/vmm/vsock.sock".into());
        args.api_sock = Some("/run/w/vmm/api.sock".into());
        args.console = "/run/w/vmm/console.log".into();
        args.shared_dirs = vec![format!("wisp={}", share.display())];
        let config = config_from(&args).unwrap();
        let j = jail_from(&jail, &config, &args).unwrap();
        let binds: Vec<(String, BindKind)> = j.binds.iter().map(|b| (b.path.display().to_string(), b.kind)).collect();
        assert_eq!(
            binds,
            vec![
                ("/dev/kvm".into(), BindKind::Device),
                ("/boot/vmlinux".into(), BindKind::FileRo),
                ("/boot/initrd.img".into(), BindKind::FileRo),
                (share.display().to_string(), BindKind::Share { ro: false }),
                ("/run/w/vmm".into(), BindKind::SocketDir),
            ]
        );
        args.nets = vec!["tap=tap0,mac=02:00:00:00:00:01".into()];
        let e = jail_from(&jail, &config_from(&args).unwrap(), &args).unwrap_err();
        assert!(e.contains("fd=N"), "{e}");
        args.nets.clear();
        args.vsock_uds = Some("relative.sock".into());
        let e = jail_from(&jail, &config_from(&args).unwrap(), &args).unwrap_err();
        assert!(e.contains("absolute"), "{e}");
    }

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
        let d = parse_shared_dir(&format!("t={p},max-inodes=100,max-handles=7")).unwrap();
        assert_eq!((d.max_inodes, d.max_handles), (100, 7));
        assert!(parse_shared_dir(&format!("t={p},max-inodes=0")).unwrap_err().contains("max-inodes=0"));
        assert!(parse_shared_dir(&format!("t={p},max-handles=x")).unwrap_err().contains("max-handles=x"));

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

        let mut a = Args::new("k");
        a.shared_dirs.push(format!("t={p}"));
        assert_eq!(config_from(&a).unwrap().shared_dirs.len(), 1);
        a.shared_dirs.push(format!("t={p},ro"));
        assert!(config_from(&a).unwrap_err().contains("tag 't' is used twice"));
    }

    #[test]
    fn net_option_parsing() {
        let mac = [0x02, 0xaa, 0xbb, 0, 0, 0x01];
        let n = parse_net("fd=7,mac=02:AA:bb:00:00:01").unwrap();
        assert_eq!(n, NetConfig { backend: NetBackend::Fd(7), mac, mtu: None });
        let n = parse_net("tap=wtap0,mac=02:aa:bb:00:00:01,mtu=9000").unwrap();
        assert_eq!(n, NetConfig { backend: NetBackend::Name("wtap0".into()), mac, mtu: Some(9000) });
        assert_eq!(parse_net("mtu=68,mac=02:aa:bb:00:00:01,fd=3").unwrap().mtu, Some(68));
        assert_eq!(parse_net("fd=3,mac=02:aa:bb:00:00:01,mtu=65535").unwrap().mtu, Some(65535));

        let m = "mac=02:00:00:00:00:01";
        let cases = [
            (format!("fd=x,{m}"), "fd=x: not a descriptor number"),
            (format!("fd=-1,{m}"), "fd=-1: not a descriptor number"),
            (format!("fd=99999999999,{m}"), "fd=99999999999: not a descriptor number"),
            (format!("fd=1,{m}"), "fd=1: descriptors 0 to 2"),
            (format!("tap=a/b,{m}"), "tap=a/b: not an interface name"),
            (format!("tap=,{m}"), "tap=: not an interface name"),
            (format!("tap=0123456789abcdef,{m}"), "tap=0123456789abcdef: not an interface name"),
            ("fd=3".to_string(), "no mac= given"),
            (m.to_string(), "no tap given"),
            (format!("fd=3,tap=x,{m}"), "'tap=x': give one fd= or tap="),
            (format!("fd=3,fd=4,{m}"), "'fd=4': give one fd= or tap="),
            (format!("fd=3,{m},{m}"), "mac= is given twice"),
            ("fd=3,mac=02:00:00:00:00".to_string(), "mac: \"02:00:00:00:00\" is not a MAC address"),
            ("fd=3,mac=02:00:00:00:00:0g".to_string(), "\"02:00:00:00:00:0g\" is not a MAC address"),
            ("fd=3,mac=02-00-00-00-00-01".to_string(), "is not a MAC address"),
            ("fd=3,mac=2:0:0:0:0:1".to_string(), "is not a MAC address"),
            ("fd=3,mac=03:00:00:00:00:01".to_string(), "multicast"),
            ("fd=3,mac=00:00:00:00:00:00".to_string(), "all-zero"),
            (format!("fd=3,{m},mtu=67"), "mtu=67: use 68 to 65535"),
            (format!("fd=3,{m},mtu=65536"), "mtu=65536: use 68 to 65535"),
            (format!("fd=3,{m},mtu="), "mtu=: use 68 to 65535"),
            (format!("fd=3,{m},mtu=1500,mtu=1500"), "mtu= is given twice"),
            (format!("fd=3,{m},bogus=1"), "unknown option 'bogus=1'"),
            (format!("fd=3,{m},ro"), "'ro' is not KEY=VALUE"),
            (String::new(), "'' is not KEY=VALUE"),
        ];
        for (arg, want) in cases {
            let e = parse_net(&arg).unwrap_err();
            assert!(e.contains(want), "{arg}: {e}");
            assert!(e.starts_with(&format!("--net {arg}: ")), "{arg}: {e}");
            assert_eq!(e.lines().count(), 1, "{arg}: {e}");
        }

        let mut a = Args::new("k");
        a.nets.push("fd=5,mac=02:00:00:00:00:01".into());
        a.nets.push("tap=wtap0,mac=02:00:00:00:00:02".into());
        assert_eq!(config_from(&a).unwrap().nets.len(), 2);
        a.nets.push("fd=5,mac=02:00:00:00:00:03".into());
        assert!(config_from(&a).unwrap_err().contains("fd=5 is used twice"));
        a.nets.pop();
        a.nets.push("tap=wtap0,mac=02:00:00:00:00:03".into());
        assert!(config_from(&a).unwrap_err().contains("tap=wtap0 is used twice"));
    }

    #[test]
    fn inherited_net_descriptors_must_be_open() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let net = |fd| NetConfig { backend: NetBackend::Fd(fd), mac: [2, 0, 0, 0, 0, 1], mtu: None };
        use std::os::fd::AsRawFd;
        assert!(check_inherited_fds(&[net(file.as_raw_fd())]).is_ok());
        let e = check_inherited_fds(&[net(file.as_raw_fd()), net(1_000_000)]).unwrap_err();
        assert!(e.contains("--net fd=1000000: descriptor 1000000 is not open"), "{e}");
        let by_name = NetConfig { backend: NetBackend::Name("x".into()), mac: [2, 0, 0, 0, 0, 1], mtu: None };
        assert!(check_inherited_fds(&[by_name]).is_ok());
    }

    #[test]
    fn bad_console_and_cid_are_refused() {
        let mut a = Args::new("k");
        assert_eq!(config_from(&a).unwrap().console, ConsoleOutput::Off);
        a.vsock_cid = 2;
        assert!(config_from(&a).unwrap_err().contains("vsock-cid"));
        a.vsock_cid = 3;
        a.console = String::new();
        assert!(config_from(&a).is_err());
    }
}
