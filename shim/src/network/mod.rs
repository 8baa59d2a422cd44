//! The pod's network, host side (Kata's "tcfilter" model).
//!
//! CNI puts a veth (usually `eth0`) with the pod's IPs into the pod's network namespace.
//! For each such interface the shim creates a tap in that namespace and joins tap and
//! interface with tc: an ingress qdisc on both and, on each ingress, a u32 filter that
//! matches every frame with the action `mirred egress redirect` to the other device. The
//! tap's fd goes to wisp-vmm's virtio-net device; the guest NIC gets the veth's MAC, so
//! the pod's IPs keep their MAC, and the agent gives it the veth's addresses, MTU and
//! routes. The veth keeps its addresses in the namespace, but every frame it receives is
//! redirected before the namespace's IP stack sees it.
//!
//! All namespace work runs on a short-lived thread that enters the namespace (setns is
//! per thread); the netlink socket opened there stays bound to the namespace, and
//! teardown uses it from any thread, so teardown still works after the namespace's bind
//! mount is gone (the socket and the tap fds keep the namespace alive until then).
//!
//! Trusts: containerd's spec for the namespace path (checked for shape), the kernel's
//! netlink answers.
//!
//! Where things are: `netns` finds the namespace in the spec and runs code in it,
//! `links` and `routes` turn what CNI left there into what the guest gets, `tc` joins the
//! taps (opened by `wisp_netlink::tap`) to the interfaces; the rtnetlink requests are
//! `wisp_netlink`'s.

mod links;
mod netns;
mod routes;
mod tc;

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use wisp_netlink::tap::TapOpenError;
use wisp_netlink::{NetlinkError, RouteSocket};
use wisp_protocols::agent::{Interface, IpAddress, Route};

use self::links::{format_mac, guest_address, HostLink};
pub use self::netns::{in_netns, netns_path};
use self::routes::guest_route;
use self::tc::tc_error;
use crate::vm::NetDevice;

/// Netlink errors that mean "already gone" during teardown.
const GONE: [i32; 3] = [libc::ENODEV, libc::ENOENT, libc::EINVAL];

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("the sandbox's OCI spec: {0}")]
    Spec(String),
    #[error("pod network namespace {path}: {reason}")]
    Netns { path: String, reason: String },
    #[error("tap device {name}: {reason}")]
    Tap { name: String, reason: String },
    #[error("netlink {op}: {msg}")]
    Netlink { op: String, errno: i32, msg: String },
    #[error("{0}")]
    Other(String),
}

type Result<T> = std::result::Result<T, NetworkError>;

impl From<NetlinkError> for NetworkError {
    fn from(e: NetlinkError) -> Self {
        let NetlinkError { op, errno, msg } = e;
        NetworkError::Netlink { op, errno, msg }
    }
}

/// The pod's network as set up in its namespace; `teardown` (or dropping it) undoes it.
pub struct PodNetwork {
    netns: PathBuf,
    /// Bound to the pod's namespace; None once torn down.
    nl: Option<RouteSocket>,
    links: Vec<PodLink>,
    routes: Vec<Route>,
}

/// One CNI interface and its tap.
struct PodLink {
    /// What the guest gets: name, the interface's MAC, MTU and addresses.
    iface: Interface,
    index: u32,
    tap_name: String,
    /// 0 until known.
    tap_index: u32,
    tap: Option<OwnedFd>,
    /// Devices this shim added an ingress qdisc to (the filters live below them).
    qdiscs: Vec<u32>,
}

impl std::fmt::Debug for PodNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<(&str, &str)> =
            self.links.iter().map(|l| (l.iface.name.as_str(), l.tap_name.as_str())).collect();
        f.debug_struct("PodNetwork").field("netns", &self.netns).field("links", &names).finish()
    }
}

impl PodNetwork {
    /// Reads the interfaces (all but loopback) and routes of the namespace at `netns`
    /// and joins each interface to a new tap. On failure nothing is left behind.
    pub fn setup(netns: &Path) -> Result<Self> {
        let path = netns.to_path_buf();
        let net = in_netns(netns, move || setup_here(path))?;
        log::info!("pod network in {}: {:?}, {} routes", netns.display(), net, net.routes.len());
        Ok(net)
    }

    /// The taps for wisp-vmm, with the MAC and MTU the guest NIC must have.
    pub fn vmm_devices(&self) -> Vec<NetDevice<'_>> {
        self.links
            .iter()
            .filter_map(|l| {
                Some(NetDevice { tap: l.tap.as_ref()?.as_fd(), mac: l.iface.mac.clone(), mtu: l.iface.mtu })
            })
            .collect()
    }

    /// The guest interfaces for the agent's UpdateInterface (matched there by MAC).
    pub fn interfaces(&self) -> Vec<Interface> {
        self.links.iter().map(|l| l.iface.clone()).collect()
    }

    /// The routes for the agent's UpdateRoutes, devices named as in the guest.
    pub fn routes(&self) -> Vec<Route> {
        self.routes.clone()
    }

    /// Removes the ingress qdiscs (and so the filters) from the CNI interfaces, deletes
    /// the taps and closes their fds. Interfaces or a namespace that are already gone
    /// are fine; other failures are logged. Runs once; later calls do nothing.
    pub fn teardown(&mut self) {
        let links = std::mem::take(&mut self.links);
        let Some(mut nl) = self.nl.take() else { return };
        for link in links {
            for &index in link.qdiscs.iter().filter(|&&i| i != link.tap_index) {
                if let Err(e) = tc::del_ingress_qdisc(&mut nl, index) {
                    report_teardown(&e, &format!("removing the ingress qdisc of {}", link.iface.name));
                }
            }
            if link.tap_index != 0 {
                if let Err(e) = nl.del_link(link.tap_index).map_err(NetworkError::from) {
                    report_teardown(&e, &format!("deleting {}", link.tap_name));
                }
            }
            // Closing the last fd deletes the tap anyway (it is not persistent).
            drop(link.tap);
        }
        log::info!("pod network in {} torn down", self.netns.display());
    }

    /// Adds the tap for `host` (the `n`th interface) and the tc plumbing between them.
    fn join(&mut self, n: usize, host: &HostLink, addresses: Vec<IpAddress>) -> Result<()> {
        let nl = self.nl.as_mut().ok_or_else(|| NetworkError::Other("the pod network was torn down".into()))?;
        let tap_name = format!("tap{n}_wisp");
        let tap = open_tap(&tap_name)?;
        let iface = Interface {
            name: host.name.clone(),
            mac: format_mac(&host.mac),
            mtu: host.mtu,
            addresses,
            ..Default::default()
        };
        // Recorded before anything else happens, so a failure below is undone.
        self.links.push(PodLink {
            iface,
            index: host.index,
            tap_name: tap_name.clone(),
            tap_index: 0,
            tap: Some(tap),
            qdiscs: Vec::new(),
        });
        let link = self.links.last_mut().ok_or_else(|| NetworkError::Other("no link".into()))?;
        link.tap_index = links::index_of(nl, &tap_name)?;
        // The tap is a wire to the guest: its own IPv6 link-local address would send
        // router solicitations and MLD into the guest. Best effort (no IPv6: nothing to do).
        if let Err(e) = links::no_ipv6_address(nl, link.tap_index) {
            log::debug!("{tap_name}: leaving IPv6 address generation on: {e}");
        }
        links::set_up(nl, link.tap_index, host.mtu)?;
        for index in [link.index, link.tap_index] {
            tc::add_ingress_qdisc(nl, index).map_err(|e| tc_error(e, &host.name))?;
            link.qdiscs.push(index);
        }
        tc::add_redirect(nl, link.index, link.tap_index).map_err(|e| tc_error(e, &host.name))?;
        tc::add_redirect(nl, link.tap_index, link.index).map_err(|e| tc_error(e, &host.name))?;
        log::info!("{} ({}) <-> {tap_name} (tc ingress, mirred redirect)", host.name, format_mac(&host.mac));
        Ok(())
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Creates the tap `name` in the calling thread's network namespace (the namespace of
/// /dev/net/tun at open time): a blocking, close-on-exec descriptor for the VMM.
fn open_tap(name: &str) -> Result<OwnedFd> {
    let err = |reason: String| NetworkError::Tap { name: name.into(), reason };
    let (fd, _) = wisp_netlink::tap::open_tap(name, false).map_err(|e| match e {
        TapOpenError::Name(_) => err("name too long".into()),
        TapOpenError::OpenTun(e) => err(format!("/dev/net/tun: {e}")),
        TapOpenError::Attach(e) => err(format!("TUNSETIFF: {e}")),
    })?;
    Ok(fd)
}

fn report_teardown(e: &NetworkError, what: &str) {
    match e {
        NetworkError::Netlink { errno, .. } if GONE.contains(errno) => log::debug!("{what}: already gone ({e})"),
        _ => log::warn!("{what}: {e}"),
    }
}

fn setup_here(netns: PathBuf) -> Result<PodNetwork> {
    let mut nl = RouteSocket::open()?;
    let hosts: Vec<HostLink> = nl.links()?.iter().map(HostLink::from).collect();
    let addresses = nl.addresses()?;
    let route_msgs = nl.routes()?;
    let mut net = PodNetwork { netns, nl: Some(nl), links: Vec::new(), routes: Vec::new() };

    let mut chosen = Vec::new();
    for h in hosts {
        match h.unusable() {
            Some(_) if h.loopback => {}
            Some(why) => log::info!("pod network: not handing {} to the guest: {why}", h.name),
            None => chosen.push(h),
        }
    }
    let names: HashMap<u32, String> = chosen.iter().map(|h| (h.index, h.name.clone())).collect();
    for m in &route_msgs {
        match guest_route(m, &names) {
            Ok(Some(r)) => net.routes.push(r),
            Ok(None) => {}
            Err(why) => log::warn!("pod network: leaving out a route the guest cannot have: {why}"),
        }
    }
    for (n, h) in chosen.iter().enumerate() {
        let addrs = addresses.iter().filter(|a| a.header.index == h.index).filter_map(guest_address).collect();
        // On failure `net` is dropped here, which undoes what was done.
        net.join(n, h, addrs)?;
    }
    if net.links.is_empty() {
        log::warn!("pod network: {} has no interface for the guest (loopback only)", net.netns.display());
    }
    Ok(net)
}
#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::tc::{
        TcActionAttribute, TcActionMirrorOption, TcActionOption, TcAttribute, TcFilterU32Option, TcMirrorActionType,
        TcOption,
    };
    use std::os::fd::AsRawFd;

    #[test]
    fn setup_fails_clearly_without_the_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("cni-gone");
        let e = PodNetwork::setup(&missing).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("cni-gone") && text.contains("No such file"), "{text}");
        // A file that is not a namespace (only root gets as far as setns).
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"").unwrap();
        let e = PodNetwork::setup(&plain).unwrap_err().to_string();
        assert!(e.contains("plain") && (e.contains("not a network namespace") || e.contains("EPERM")), "{e}");
    }

    // ---- root only: real namespaces, veth, tap and tc ----

    /// Two network namespaces made with `ip netns`: "pod" (what CNI prepares) and
    /// "peer" (the far end of the veth, standing in for the host's bridge). Deleted on
    /// drop; nothing is created in the test machine's own namespace.
    struct TestNetns {
        pod: String,
        peer: String,
    }

    fn ip(args: &[&str]) {
        let out = std::process::Command::new("ip").args(args).output().expect("running ip (iproute2)");
        assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    }

    impl TestNetns {
        fn new(tag: &str) -> Self {
            let id = std::process::id();
            let ns = Self { pod: format!("wisp-{id}-{tag}-pod"), peer: format!("wisp-{id}-{tag}-peer") };
            ip(&["netns", "add", &ns.pod]);
            ip(&["netns", "add", &ns.peer]);
            ns
        }

        /// CNI's part: eth0 in the pod, its peer in "peer", addresses and routes.
        fn add_veth(&self) {
            let (pod, peer) = (self.pod.as_str(), self.peer.as_str());
            ip(&["-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", "netns", peer]);
            ip(&["-n", pod, "link", "set", "eth0", "address", "02:77:00:00:00:02", "mtu", "1450", "up"]);
            ip(&["-n", peer, "link", "set", "peer0", "address", "02:77:00:00:00:01", "mtu", "1450", "up"]);
            ip(&["-n", pod, "addr", "add", "10.77.0.2/24", "dev", "eth0"]);
            ip(&["-n", pod, "addr", "add", "fd77::2/64", "dev", "eth0", "nodad"]);
            ip(&["-n", pod, "route", "add", "default", "via", "10.77.0.1"]);
            ip(&["-n", pod, "route", "add", "10.99.0.0/16", "via", "10.77.0.1", "metric", "5"]);
            ip(&["-n", pod, "-6", "route", "add", "default", "via", "fd77::1"]);
        }

        fn path(name: &str) -> PathBuf {
            PathBuf::from("/run/netns").join(name)
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            for n in [&self.pod, &self.peer] {
                let _ = std::process::Command::new("ip").args(["netns", "del", n]).output();
            }
        }
    }

    /// What is in a namespace: its links, its ingress qdiscs (device index), and per
    /// device the mirred actions of its ingress filters (target index, kind).
    #[derive(Debug)]
    struct Snapshot {
        links: Vec<HostLink>,
        /// Indexes of the devices with an address, one entry per address.
        addressed: Vec<u32>,
        ingress: Vec<u32>,
        redirects: HashMap<u32, Vec<(u32, TcMirrorActionType)>>,
    }

    impl Snapshot {
        fn link(&self, name: &str) -> Option<&HostLink> {
            self.links.iter().find(|l| l.name == name)
        }
    }

    fn snapshot(netns: &Path) -> Snapshot {
        in_netns(netns, || {
            let mut nl = RouteSocket::open()?;
            let links: Vec<HostLink> = nl.links()?.iter().map(HostLink::from).collect();
            let addressed = nl.addresses()?.iter().map(|a| a.header.index).collect();
            let ingress = tc::qdiscs(&mut nl)?
                .into_iter()
                .filter(|q| q.attributes.contains(&TcAttribute::Kind("ingress".into())))
                .map(|q| q.header.index as u32)
                .collect();
            let mut redirects = HashMap::new();
            for l in &links {
                let mut found = Vec::new();
                // A device without an ingress qdisc has no filters to list.
                for f in tc::ingress_filters(&mut nl, l.index).unwrap_or_default() {
                    for a in &f.attributes {
                        let TcAttribute::Options(opts) = a else { continue };
                        for o in opts {
                            let TcOption::U32(TcFilterU32Option::Action(acts)) = o else { continue };
                            for act in acts {
                                for aa in &act.attributes {
                                    let TcActionAttribute::Options(aopts) = aa else { continue };
                                    for ao in aopts {
                                        if let TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) = ao {
                                            found.push((p.ifindex, p.eaction));
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                redirects.insert(l.index, found);
            }
            Ok(Snapshot { links, addressed, ingress, redirects })
        })
        .expect("inspecting the namespace")
    }

    const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];

    fn frame(dst: [u8; 6], src: [u8; 6], text: &[u8]) -> Vec<u8> {
        let mut f = [&dst[..], &src[..], &TEST_ETHERTYPE[..], text].concat();
        f.resize(60, 0);
        f
    }

    /// Waits up to 3 s for a read from `fd` that `wanted` accepts.
    fn await_read(fd: i32, wanted: impl Fn(&[u8]) -> bool) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let mut buf = vec![0u8; 65536];
        while std::time::Instant::now() < deadline {
            let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                continue;
            }
            // SAFETY: reads into our buffer, at most its length.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 && wanted(&buf[..n as usize]) {
                return true;
            }
        }
        false
    }

    /// In the peer's namespace: a frame written to the tap (as the VMM would, after a
    /// virtio-net header) comes out of peer0, and a frame sent on peer0 can be read
    /// from the tap. Returns (tap -> peer, peer -> tap).
    fn exchange(peer: &Path, tap: OwnedFd) -> (bool, bool) {
        in_netns(peer, move || {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: plain socket(2); the fd is owned right away.
            let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto.into()) };
            assert!(raw >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
            // SAFETY: just created, owned by nothing else.
            let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
            // SAFETY: a valid C string.
            let index = unsafe { libc::if_nametoindex(c"peer0".as_ptr()) };
            assert_ne!(index, 0, "peer0 not found");
            // SAFETY: sockaddr_ll is plain data; zero is a valid start.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = index as i32;
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: binds our socket to a valid sockaddr_ll of that length.
            let rc = unsafe { libc::bind(sock.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), len) };
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());

            let out = frame([0xff; 6], [0x02, 0x77, 0, 0, 0, 0x10], b"wisp-to-peer");
            let with_hdr = [&[0u8; 10][..], &out].concat();
            // SAFETY: writes our buffer to the tap fd.
            let n = unsafe { libc::write(tap.as_raw_fd(), with_hdr.as_ptr().cast(), with_hdr.len()) };
            assert_eq!(n, with_hdr.len() as isize, "write to the tap: {}", std::io::Error::last_os_error());
            let to_peer = await_read(sock.as_raw_fd(), |f| f.len() >= 60 && f[..60] == out[..]);

            let back = frame([0x02, 0x77, 0, 0, 0, 0x02], [0x02, 0x77, 0, 0, 0, 0x01], b"peer-to-wisp");
            // SAFETY: sends our buffer on the bound packet socket.
            let n = unsafe { libc::send(sock.as_raw_fd(), back.as_ptr().cast(), back.len(), 0) };
            assert_eq!(n, back.len() as isize, "send on peer0: {}", std::io::Error::last_os_error());
            let to_tap = await_read(tap.as_raw_fd(), |f| f.len() >= 70 && f[10..70] == back[..]);
            Ok((to_peer, to_tap))
        })
        .expect("exchanging frames")
    }

    fn setup_or_explain(path: &Path) -> PodNetwork {
        PodNetwork::setup(path).unwrap_or_else(|e| {
            let why = e.to_string();
            if why.contains("does the kernel have") {
                panic!("cannot run here (not a wisp failure): this kernel lacks tc ingress/u32/mirred: {why}");
            }
            panic!("PodNetwork::setup: {why}");
        })
    }

    #[test]
    #[ignore = "needs root (network namespaces, veth, tap, tc); run as root with --ignored (make unit does)"]
    fn joins_the_cni_interface_to_a_tap_and_tears_it_down() {
        let ns = TestNetns::new("join");
        ns.add_veth();
        let (pod, peer) = (TestNetns::path(&ns.pod), TestNetns::path(&ns.peer));
        let mut net = setup_or_explain(&pod);

        let ifs = net.interfaces();
        assert_eq!(ifs.len(), 1, "{ifs:?}");
        assert_eq!((ifs[0].name.as_str(), ifs[0].mac.as_str(), ifs[0].mtu), ("eth0", "02:77:00:00:00:02", 1450));
        let mut addrs: Vec<String> =
            ifs[0].addresses.iter().map(|a| format!("{}/{}", a.address, a.prefix_len)).collect();
        addrs.sort();
        assert_eq!(addrs, ["10.77.0.2/24", "fd77::2/64"]);
        let mut routes: Vec<String> =
            net.routes().iter().map(|r| format!("{}|{}|{}|{}", r.destination, r.gateway, r.device, r.metric)).collect();
        routes.sort();
        assert_eq!(routes, ["10.99.0.0/16|10.77.0.1|eth0|5", "|10.77.0.1|eth0|0", "|fd77::1|eth0|1024"]);

        let devices = net.vmm_devices();
        assert_eq!(devices.len(), 1);
        assert_eq!((devices[0].mac.as_str(), devices[0].mtu), ("02:77:00:00:00:02", 1450));
        let tap_fd = devices[0].tap.try_clone_to_owned().unwrap();
        drop(devices);

        let s = snapshot(&pod);
        let eth0 = s.link("eth0").expect("eth0").clone();
        let tap = s.link("tap0_wisp").unwrap_or_else(|| panic!("no tap0_wisp in {:?}", s.links)).clone();
        assert!(tap.tun && tap.up && tap.mtu == 1450, "{tap:?}");
        assert_ne!(tap.mac, eth0.mac, "the tap keeps its own MAC");
        assert!(!s.addressed.contains(&tap.index), "the tap has an address (IPv6 link-local?): {s:?}");
        assert!(s.ingress.contains(&eth0.index) && s.ingress.contains(&tap.index), "{s:?}");
        assert_eq!(s.redirects[&eth0.index], [(tap.index, TcMirrorActionType::EgressRedir)], "{s:?}");
        assert_eq!(s.redirects[&tap.index], [(eth0.index, TcMirrorActionType::EgressRedir)], "{s:?}");

        assert_eq!(exchange(&peer, tap_fd), (true, true), "frames between the tap and the veth's far end");

        net.teardown();
        let s = snapshot(&pod);
        assert!(s.link("tap0_wisp").is_none(), "the tap is still there: {:?}", s.links);
        let eth0_after = s.link("eth0").expect("eth0 must stay (CNI deletes it)");
        assert!(!s.ingress.contains(&eth0_after.index), "eth0 still has an ingress qdisc: {s:?}");
        net.teardown(); // twice is fine
        ip(&["-n", &ns.pod, "link", "del", "eth0"]); // what CNI DEL does
    }

    #[test]
    #[ignore = "needs root (network namespaces, veth, tap, tc); run as root with --ignored (make unit does)"]
    fn teardown_after_cni_del_and_the_namespace_is_gone() {
        let ns = TestNetns::new("gone");
        ns.add_veth();
        let pod = TestNetns::path(&ns.pod);
        let mut net = setup_or_explain(&pod);
        // CNI DEL deletes the veth, then containerd removes the namespace's bind mount.
        ip(&["-n", &ns.peer, "link", "del", "peer0"]);
        ip(&["netns", "del", &ns.pod]);
        net.teardown();
        let e = PodNetwork::setup(&pod).unwrap_err().to_string();
        assert!(e.contains(&ns.pod) && e.contains("No such file"), "{e}");
    }

    #[test]
    #[ignore = "needs root (network namespaces); run as root with --ignored (make unit does)"]
    fn a_namespace_with_only_loopback_gives_no_devices() {
        let ns = TestNetns::new("lo");
        let mut net = setup_or_explain(&TestNetns::path(&ns.pod));
        assert!(net.vmm_devices().is_empty() && net.interfaces().is_empty() && net.routes().is_empty(), "{net:?}");
        net.teardown();
    }
}
