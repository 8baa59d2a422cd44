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

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirror, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32, TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;
use serde_json::Value;
use wisp_netlink::{NetlinkError, RouteSocket};
use wisp_protocols::agent::{Interface, IpAddress, Route};

use crate::vm::NetDevice;

/// The ingress qdisc's handle (`ffff:`); its filters hang below it.
const INGRESS_HANDLE: TcHandle = TcHandle { major: 0xffff, minor: 0 };
/// Priority of the redirect filters.
const FILTER_PRIO: u32 = 1;
/// ETH_P_ALL: the filters see every protocol.
const ETH_P_ALL: u16 = 0x0003;
const TUN_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
const TUNSETIFF: libc::c_ulong = nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()) as _;
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

/// The pod's network namespace from the sandbox container's spec: the `path` of the
/// `linux.namespaces` entry of type `network`. None when there is no such entry (host
/// network) or it has no path (a fresh namespace: the pod has no network but loopback).
pub fn netns_path(spec: &Value) -> Result<Option<PathBuf>> {
    let Some(namespaces) = spec.pointer("/linux/namespaces") else { return Ok(None) };
    if namespaces.is_null() {
        return Ok(None);
    }
    let bad = |why: String| NetworkError::Spec(why);
    let list = namespaces.as_array().ok_or_else(|| bad(format!("linux.namespaces is not a list: {namespaces}")))?;
    let mut found: Option<Option<PathBuf>> = None;
    for ns in list {
        let entry =
            ns.as_object().ok_or_else(|| bad(format!("linux.namespaces has an entry that is not an object: {ns}")))?;
        if entry.get("type").and_then(Value::as_str) != Some("network") {
            continue;
        }
        if found.is_some() {
            return Err(bad("linux.namespaces has more than one network namespace".into()));
        }
        found = Some(match entry.get("path") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => {
                let p = PathBuf::from(s);
                if !p.is_absolute() {
                    return Err(bad(format!("the network namespace path {s:?} is not absolute")));
                }
                Some(p)
            }
            Some(other) => return Err(bad(format!("the network namespace path is not a string: {other}"))),
        });
    }
    Ok(found.flatten())
}

/// The pod's network as set up in its namespace; `teardown` (or dropping it) undoes it.
pub struct PodNetwork {
    netns: PathBuf,
    /// Bound to the pod's namespace; None once torn down.
    nl: Option<Netlink>,
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
                if let Err(e) = nl.del_ingress_qdisc(index) {
                    report_teardown(&e, &format!("removing the ingress qdisc of {}", link.iface.name));
                }
            }
            if link.tap_index != 0 {
                if let Err(e) = nl.del_link(link.tap_index) {
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
        link.tap_index = nl.index_of(&tap_name)?;
        // The tap is a wire to the guest: its own IPv6 link-local address would send
        // router solicitations and MLD into the guest. Best effort (no IPv6: nothing to do).
        if let Err(e) = nl.no_ipv6_address(link.tap_index) {
            log::debug!("{tap_name}: leaving IPv6 address generation on: {e}");
        }
        nl.set_up(link.tap_index, host.mtu)?;
        for index in [link.index, link.tap_index] {
            nl.add_ingress_qdisc(index).map_err(|e| tc_error(e, &host.name))?;
            link.qdiscs.push(index);
        }
        nl.add_redirect(link.index, link.tap_index).map_err(|e| tc_error(e, &host.name))?;
        nl.add_redirect(link.tap_index, link.index).map_err(|e| tc_error(e, &host.name))?;
        log::info!("{} ({}) <-> {tap_name} (tc ingress, mirred redirect)", host.name, format_mac(&host.mac));
        Ok(())
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn report_teardown(e: &NetworkError, what: &str) {
    match e {
        NetworkError::Netlink { errno, .. } if GONE.contains(errno) => log::debug!("{what}: already gone ({e})"),
        _ => log::warn!("{what}: {e}"),
    }
}

/// A tc request the kernel refused: names the interface, and the modules when the
/// kernel does not know the qdisc, classifier or action.
fn tc_error(e: NetworkError, dev: &str) -> NetworkError {
    match e {
        NetworkError::Netlink { op, errno, msg } => {
            let hint = if errno == libc::ENOENT || errno == libc::EOPNOTSUPP {
                " (does the kernel have sch_ingress, cls_u32 and act_mirred?)"
            } else {
                ""
            };
            NetworkError::Netlink { op: format!("{op} on {dev}"), errno, msg: format!("{msg}{hint}") }
        }
        other => other,
    }
}

/// Runs `f` on a new thread that has entered the network namespace at `netns`; the
/// thread ends with `f`, so no thread of the shim is ever left in the pod's namespace.
pub fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let path = netns.to_path_buf();
    let shown = netns.display().to_string();
    let netns_error = move |reason: String| NetworkError::Netns { path: shown.clone(), reason };
    let err = netns_error.clone();
    let thread = std::thread::Builder::new()
        .name("wisp-netns".into())
        .spawn(move || {
            let file = File::open(&path).map_err(|e| err(e.to_string()))?;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                err(match e {
                    nix::errno::Errno::EINVAL => "not a network namespace".to_string(),
                    e => format!("entering it: {e}"),
                })
            })?;
            drop(file);
            f()
        })
        .map_err(|e| netns_error(format!("starting a thread for it: {e}")))?;
    thread.join().map_err(|_| NetworkError::Other(format!("the thread working in {} panicked", netns.display())))?
}

fn setup_here(netns: PathBuf) -> Result<PodNetwork> {
    let mut nl = Netlink::open()?;
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

/// What the shim needs to know about a link in the pod's namespace.
#[derive(Debug, Clone, Default)]
struct HostLink {
    index: u32,
    name: String,
    mac: Vec<u8>,
    mtu: u32,
    up: bool,
    loopback: bool,
    ether: bool,
    tun: bool,
}

impl From<&LinkMessage> for HostLink {
    fn from(l: &LinkMessage) -> Self {
        let mut h = HostLink {
            index: l.header.index,
            up: l.header.flags.contains(LinkFlags::Up),
            loopback: l.header.flags.contains(LinkFlags::Loopback),
            ether: l.header.link_layer_type == LinkLayerType::Ether,
            ..Default::default()
        };
        for a in &l.attributes {
            match a {
                LinkAttribute::IfName(n) => h.name = n.clone(),
                LinkAttribute::Address(m) => h.mac = m.clone(),
                LinkAttribute::Mtu(m) => h.mtu = *m,
                LinkAttribute::LinkInfo(infos) => {
                    h.tun |= infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Tun)));
                }
                _ => {}
            }
        }
        h
    }
}

impl HostLink {
    /// Why this link does not go to the guest, if it does not: loopback, the fallback
    /// tunnel devices some modules put in every namespace (not Ethernet, or no MAC, or
    /// down), tun/tap devices (ours).
    fn unusable(&self) -> Option<&'static str> {
        if self.loopback {
            Some("loopback")
        } else if !self.ether {
            Some("not an Ethernet device")
        } else if self.tun {
            Some("a tun/tap device")
        } else if self.mac.len() != 6 || self.mac.iter().all(|b| *b == 0) {
            Some("no MAC address")
        } else if !self.up {
            Some("down")
        } else if self.name.is_empty() {
            Some("no name")
        } else {
            None
        }
    }
}

fn format_mac(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A global address of an interface for the guest (link-local and host addresses are
/// the guest kernel's own business).
fn guest_address(a: &AddressMessage) -> Option<IpAddress> {
    if a.header.scope != AddressScope::Universe {
        return None;
    }
    let local = a.attributes.iter().find_map(|x| match x {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = a.attributes.iter().find_map(|x| match x {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    let ip = local.or(address)?;
    Some(IpAddress { address: ip.to_string(), prefix_len: u32::from(a.header.prefix_len), ..Default::default() })
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

/// A route of the pod's namespace as the guest gets it. Ok(None): not the guest's
/// (other tables, non-unicast, routes the kernel makes from addresses, IPv6 link-local
/// and multicast destinations, other devices); Err: a route the guest cannot have.
fn guest_route(m: &RouteMessage, devices: &HashMap<u32, String>) -> std::result::Result<Option<Route>, String> {
    let h = &m.header;
    let table = m
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(h.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) || h.kind != RouteType::Unicast {
        return Ok(None);
    }
    // The guest kernel makes the same routes when the agent adds the addresses.
    if h.protocol == RouteProtocol::Kernel {
        return Ok(None);
    }
    let mut route = Route { scope: u32::from(u8::from(h.scope)), ..Default::default() };
    let (mut dest, mut oif) = (None, None);
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dest = Some(route_ip(d).ok_or_else(|| format!("destination {d:?}"))?),
            RouteAttribute::Gateway(g) => {
                route.gateway = route_ip(g).ok_or_else(|| format!("gateway {g:?}"))?.to_string()
            }
            RouteAttribute::PrefSource(s) => {
                route.source = route_ip(s).ok_or_else(|| format!("source {s:?}"))?.to_string()
            }
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => route.metric = *p,
            RouteAttribute::MultiPath(hops) => return Err(format!("a multipath route ({} hops)", hops.len())),
            RouteAttribute::Via(v) => return Err(format!("a route via {v:?}")),
            RouteAttribute::Encap(_) | RouteAttribute::EncapType(_) => {
                return Err("an encapsulated (lwtunnel) route".to_string())
            }
            _ => {}
        }
    }
    let Some(device) = oif.and_then(|i| devices.get(&i)) else { return Ok(None) };
    route.device = device.clone();
    match dest {
        Some(IpAddr::V6(v6)) if (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.is_multicast() => return Ok(None),
        Some(IpAddr::V4(v4)) if v4.is_multicast() => return Ok(None),
        Some(ip) => route.destination = format!("{ip}/{}", h.destination_prefix_length),
        None if h.destination_prefix_length == 0 => {}
        None => return Err(format!("a /{} route without destination", h.destination_prefix_length)),
    }
    Ok(Some(route))
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates the tap `name` in the calling thread's network namespace (the namespace of
/// /dev/net/tun at open time).
fn open_tap(name: &str) -> Result<OwnedFd> {
    let err = |reason: String| NetworkError::Tap { name: name.into(), reason };
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(err("name too long".into()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| err(format!("/dev/net/tun: {e}")))?;
    let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags: TUN_FLAGS as libc::c_short, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq is laid out as
    // (name, then the union starting with the flags; 40 bytes), on an fd we own.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(err(format!("TUNSETIFF: {}", std::io::Error::last_os_error())));
    }
    Ok(OwnedFd::from(file))
}

/// The ingress qdisc (`tc qdisc add dev X handle ffff: ingress`).
fn ingress_qdisc(index: u32) -> TcMessage {
    let mut m = TcMessage::with_index(index as i32);
    m.header.parent = TcHandle::INGRESS;
    m.header.handle = INGRESS_HANDLE;
    m.attributes.push(TcAttribute::Kind("ingress".into()));
    m
}

/// `tc filter add dev FROM parent ffff: protocol all prio 1 u32 match u32 0 0
/// action mirred egress redirect dev TO`.
fn redirect_filter(from: u32, to: u32) -> TcMessage {
    let mut m = TcMessage::with_index(from as i32);
    m.header.parent = INGRESS_HANDLE;
    // TC_H_MAKE(prio << 16, htons(protocol)).
    m.header.info = (FILTER_PRIO << 16) | u32::from(ETH_P_ALL.to_be());
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()]; // mask 0, value 0: every frame
    let mut mirred = TcMirror::default();
    mirred.generic.action = TcActionType::Stolen;
    mirred.eaction = TcMirrorActionType::EgressRedir;
    mirred.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.into()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(mirred))]),
    ];
    m.attributes = vec![
        TcAttribute::Kind(TcFilterU32::KIND.into()),
        TcAttribute::Options(vec![
            TcOption::U32(TcFilterU32Option::Selector(selector)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ]),
    ];
    m
}

/// The rtnetlink socket of the namespace it was opened in, with the shim's requests.
struct Netlink(RouteSocket);

impl Netlink {
    fn open() -> Result<Self> {
        Ok(Self(RouteSocket::open()?))
    }

    fn request(&mut self, op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>> {
        Ok(self.0.request(op, msg, flags)?)
    }

    fn links(&mut self) -> Result<Vec<LinkMessage>> {
        Ok(self.0.links()?)
    }

    fn index_of(&mut self, name: &str) -> Result<u32> {
        self.links()?.iter().map(HostLink::from).find(|l| l.name == name).map(|l| l.index).ok_or_else(|| {
            NetworkError::Netlink { op: format!("finding {name}"), errno: libc::ENODEV, msg: "no such device".into() }
        })
    }

    fn addresses(&mut self) -> Result<Vec<AddressMessage>> {
        let answers =
            self.request("list addresses", RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP)?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => Some(a),
                _ => None,
            })
            .collect())
    }

    fn routes(&mut self) -> Result<Vec<RouteMessage>> {
        let answers =
            self.request("list routes", RouteNetlinkMessage::GetRoute(RouteMessage::default()), NLM_F_DUMP)?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .collect())
    }

    /// Sets the MTU and brings the link up.
    fn set_up(&mut self, index: u32, mtu: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.header.change_mask = LinkFlags::Up;
        m.header.flags = LinkFlags::Up;
        if mtu != 0 {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        self.request("set tap MTU and up", RouteNetlinkMessage::SetLink(m), NLM_F_ACK)?;
        Ok(())
    }

    /// `ip link set X addrgenmode none` (while the link is down).
    fn no_ipv6_address(&mut self, index: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        let mode = AfSpecInet6::AddrGenMode(In6AddrGenMode::None);
        m.attributes.push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![mode])]));
        self.request("set addrgenmode none", RouteNetlinkMessage::SetLink(m), NLM_F_ACK)?;
        Ok(())
    }

    fn del_link(&mut self, index: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.request("delete link", RouteNetlinkMessage::DelLink(m), NLM_F_ACK)?;
        Ok(())
    }

    fn add_ingress_qdisc(&mut self, index: u32) -> Result<()> {
        let flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        self.request("add ingress qdisc", RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(index)), flags)?;
        Ok(())
    }

    fn del_ingress_qdisc(&mut self, index: u32) -> Result<()> {
        self.request("delete ingress qdisc", RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)), NLM_F_ACK)?;
        Ok(())
    }

    fn add_redirect(&mut self, from: u32, to: u32) -> Result<()> {
        let flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        self.request(
            "add mirred redirect filter",
            RouteNetlinkMessage::NewTrafficFilter(redirect_filter(from, to)),
            flags,
        )?;
        Ok(())
    }

    #[cfg(test)]
    fn qdiscs(&mut self) -> Result<Vec<TcMessage>> {
        let answers =
            self.request("list qdiscs", RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()), NLM_F_DUMP)?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewQueueDiscipline(q) => Some(q),
                _ => None,
            })
            .collect())
    }

    #[cfg(test)]
    fn ingress_filters(&mut self, index: u32) -> Result<Vec<TcMessage>> {
        let mut q = TcMessage::with_index(index as i32);
        q.header.parent = INGRESS_HANDLE;
        let answers = self.request("list filters", RouteNetlinkMessage::GetTrafficFilter(q), NLM_F_DUMP)?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewTrafficFilter(f) => Some(f),
                _ => None,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, Parseable};
    use netlink_packet_route::route::RouteScope;
    use netlink_packet_route::tc::TcMessageBuffer;
    use netlink_packet_route::AddressFamily;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn spec(namespaces: Value) -> Value {
        serde_json::json!({ "process": {}, "linux": { "namespaces": namespaces } })
    }

    #[test]
    fn the_netns_path_comes_from_the_network_namespace_entry() {
        let cri = spec(serde_json::json!([
            { "type": "pid" }, { "type": "ipc" },
            { "type": "network", "path": "/var/run/netns/cni-1234" }, { "type": "mount" }
        ]));
        assert_eq!(netns_path(&cri).unwrap(), Some(PathBuf::from("/var/run/netns/cni-1234")));
        // ctr without networking: a fresh namespace; host network: no entry at all.
        assert_eq!(netns_path(&spec(serde_json::json!([{ "type": "network" }]))).unwrap(), None);
        assert_eq!(netns_path(&spec(serde_json::json!([{ "type": "network", "path": "" }]))).unwrap(), None);
        assert_eq!(netns_path(&spec(serde_json::json!([{ "type": "pid" }]))).unwrap(), None);
        assert_eq!(netns_path(&serde_json::json!({ "process": {} })).unwrap(), None);
        assert_eq!(netns_path(&serde_json::json!({ "process": {}, "linux": {} })).unwrap(), None);
        assert_eq!(netns_path(&spec(Value::Null)).unwrap(), None);
    }

    #[test]
    fn malformed_namespace_lists_are_errors() {
        let cases = [
            (serde_json::json!({ "type": "network" }), "not a list"),
            (serde_json::json!(["network"]), "not an object"),
            (serde_json::json!([{ "type": "network", "path": 7 }]), "not a string"),
            (serde_json::json!([{ "type": "network", "path": "netns/x" }]), "not absolute"),
            (
                serde_json::json!([{ "type": "network", "path": "/a" }, { "type": "network", "path": "/b" }]),
                "more than one",
            ),
        ];
        for (namespaces, want) in cases {
            let e = netns_path(&spec(namespaces.clone())).unwrap_err();
            assert!(matches!(e, NetworkError::Spec(_)), "{namespaces}: {e}");
            assert!(e.to_string().contains(want), "{namespaces}: {e}");
        }
    }

    fn devices() -> HashMap<u32, String> {
        HashMap::from([(2, "eth0".to_string()), (3, "net1".to_string())])
    }

    fn route(family: AddressFamily, attrs: Vec<RouteAttribute>, f: impl FnOnce(&mut RouteHeader)) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = family;
        m.header.table = RouteHeader::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Universe;
        m.header.kind = RouteType::Unicast;
        f(&mut m.header);
        m.attributes = attrs;
        m
    }

    /// The routes go through the wire format, as the kernel's answers do.
    fn through_the_wire(msgs: Vec<RouteMessage>) -> Vec<RouteMessage> {
        let mut data = Vec::new();
        for m in msgs {
            data.extend(wisp_netlink::encode(RouteNetlinkMessage::NewRoute(m), NLM_F_DUMP, 9));
        }
        wisp_netlink::decode(&data)
            .unwrap()
            .into_iter()
            .map(|m| match m.payload {
                netlink_packet_core::NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => r,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn routes_become_guest_routes() {
        use RouteAttribute::*;
        let v4 = |a: [u8; 4]| RouteAddress::Inet(Ipv4Addr::from(a));
        let v6 = |s: &str| RouteAddress::Inet6(s.parse::<Ipv6Addr>().unwrap());
        let inet = AddressFamily::Inet;
        let msgs = vec![
            // default via 10.88.0.1 dev eth0
            route(inet, vec![Table(254), Gateway(v4([10, 88, 0, 1])), Oif(2)], |_| {}),
            // 10.99.0.0/16 via 10.88.0.1 dev eth0 src 10.88.0.5 metric 5
            route(
                inet,
                vec![
                    Destination(v4([10, 99, 0, 0])),
                    Gateway(v4([10, 88, 0, 1])),
                    PrefSource(v4([10, 88, 0, 5])),
                    Oif(2),
                    Priority(5),
                ],
                |h| h.destination_prefix_length = 16,
            ),
            // Calico style: 169.254.1.1 dev eth0 scope link (kept)
            route(inet, vec![Destination(v4([169, 254, 1, 1])), Oif(2)], |h| {
                h.destination_prefix_length = 32;
                h.scope = RouteScope::Link;
            }),
            // 10.88.0.0/16 dev eth0 proto kernel (the guest makes its own)
            route(inet, vec![Destination(v4([10, 88, 0, 0])), Oif(2)], |h| {
                h.destination_prefix_length = 16;
                h.protocol = RouteProtocol::Kernel;
                h.scope = RouteScope::Link;
            }),
            // local table
            route(inet, vec![Destination(v4([10, 88, 0, 5])), Oif(2)], |h| {
                h.destination_prefix_length = 32;
                h.table = 255;
                h.kind = RouteType::Local;
            }),
            // a device the guest does not get
            route(inet, vec![Destination(v4([10, 7, 0, 0])), Oif(9)], |h| h.destination_prefix_length = 16),
            // IPv6: default via fd00::1, fe80::/64 (boot, still left out), multicast
            route(AddressFamily::Inet6, vec![Table(254), Gateway(v6("fd00::1")), Oif(3), Priority(1024)], |_| {}),
            route(AddressFamily::Inet6, vec![Destination(v6("fe80::")), Oif(3)], |h| h.destination_prefix_length = 64),
            route(AddressFamily::Inet6, vec![Destination(v6("ff00::")), Oif(3)], |h| h.destination_prefix_length = 8),
            // the table attribute wins over the header's
            route(inet, vec![Table(1000), Gateway(v4([10, 88, 0, 1])), Oif(2)], |h| h.table = 252),
        ];
        let got: Vec<Route> =
            through_the_wire(msgs).iter().filter_map(|m| guest_route(m, &devices()).unwrap()).collect();
        let want = [
            ("", "10.88.0.1", "eth0", "", 0, 0),
            ("10.99.0.0/16", "10.88.0.1", "eth0", "10.88.0.5", 0, 5),
            ("169.254.1.1/32", "", "eth0", "", 253, 0),
            ("", "fd00::1", "net1", "", 0, 1024),
        ];
        let got: Vec<_> = got
            .iter()
            .map(|r| {
                (r.destination.as_str(), r.gateway.as_str(), r.device.as_str(), r.source.as_str(), r.scope, r.metric)
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn routes_the_guest_cannot_have_are_reported() {
        use netlink_packet_route::route::RouteNextHop;
        let multipath =
            route(AddressFamily::Inet, vec![RouteAttribute::MultiPath(vec![RouteNextHop::default()])], |_| {});
        assert!(guest_route(&multipath, &devices()).unwrap_err().contains("multipath"));
        let no_dest = route(AddressFamily::Inet, vec![RouteAttribute::Oif(2)], |h| h.destination_prefix_length = 8);
        assert!(guest_route(&no_dest, &devices()).is_err());
    }

    #[test]
    fn addresses_and_links_for_the_guest() {
        let mut a = AddressMessage::default();
        a.header.prefix_len = 24;
        a.header.index = 2;
        let ip: IpAddr = "10.88.0.5".parse().unwrap();
        a.attributes = vec![AddressAttribute::Address(ip), AddressAttribute::Local(ip)];
        let got = guest_address(&a).unwrap();
        assert_eq!((got.address.as_str(), got.prefix_len), ("10.88.0.5", 24));
        a.header.scope = AddressScope::Link;
        assert!(guest_address(&a).is_none());

        let eth0 = HostLink {
            index: 2,
            name: "eth0".into(),
            mac: vec![2, 0, 0x0a, 0x58, 0, 5],
            mtu: 1450,
            up: true,
            ether: true,
            ..Default::default()
        };
        assert_eq!(eth0.unusable(), None);
        assert_eq!(format_mac(&eth0.mac), "02:00:0a:58:00:05");
        let cases = [
            (HostLink { loopback: true, ..eth0.clone() }, "loopback"),
            (HostLink { ether: false, ..eth0.clone() }, "Ethernet"),
            (HostLink { tun: true, ..eth0.clone() }, "tun"),
            (HostLink { mac: vec![0; 6], ..eth0.clone() }, "MAC"),
            (HostLink { up: false, ..eth0.clone() }, "down"),
        ];
        for (l, why) in cases {
            assert!(l.unusable().unwrap().contains(why), "{l:?}");
        }
    }

    fn parsed(m: &TcMessage) -> TcMessage {
        let mut buf = vec![0; m.buffer_len()];
        m.emit(&mut buf);
        TcMessage::parse(&TcMessageBuffer::new(&buf)).unwrap()
    }

    #[test]
    fn the_tc_messages_are_what_tc_would_send() {
        let q = parsed(&ingress_qdisc(7));
        assert_eq!(q.header.index, 7);
        assert_eq!(u32::from(q.header.parent), 0xffff_fff1);
        assert_eq!(u32::from(q.header.handle), 0xffff_0000);
        assert_eq!(q.attributes, vec![TcAttribute::Kind("ingress".into())]);

        let raw = {
            let f = redirect_filter(7, 9);
            let mut buf = vec![0; f.buffer_len()];
            f.emit(&mut buf);
            buf
        };
        // tcm_info: prio 1, protocol ETH_P_ALL in network byte order.
        assert_eq!(&raw[16..20], &[0x00, 0x03, 0x01, 0x00][..], "info (little endian u32 of 0x0001_0300)");
        let f = TcMessage::parse(&TcMessageBuffer::new(&raw)).unwrap();
        assert_eq!((f.header.index, u32::from(f.header.parent)), (7, 0xffff_0000));
        assert_eq!(f.attributes[0], TcAttribute::Kind("u32".into()));
        let TcAttribute::Options(opts) = &f.attributes[1] else { panic!("{:?}", f.attributes) };
        let TcOption::U32(TcFilterU32Option::Selector(sel)) = &opts[0] else { panic!("{opts:?}") };
        assert_eq!((sel.flags, sel.nkeys, sel.keys.len()), (TcU32SelectorFlags::Terminal, 1, 1));
        assert_eq!((sel.keys[0].mask, sel.keys[0].val, sel.keys[0].off), (0, 0, 0));
        let TcOption::U32(TcFilterU32Option::Action(acts)) = &opts[1] else { panic!("{opts:?}") };
        assert_eq!(acts.len(), 1);
        assert_eq!(acts[0].attributes[0], TcActionAttribute::Kind("mirred".into()));
        let TcActionAttribute::Options(aopts) = &acts[0].attributes[1] else { panic!("{acts:?}") };
        let TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) = &aopts[0] else { panic!("{aopts:?}") };
        assert_eq!(
            (p.eaction, p.ifindex, p.generic.action),
            (TcMirrorActionType::EgressRedir, 9, TcActionType::Stolen)
        );
    }

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
            let mut nl = Netlink::open()?;
            let links: Vec<HostLink> = nl.links()?.iter().map(HostLink::from).collect();
            let addressed = nl.addresses()?.iter().map(|a| a.header.index).collect();
            let ingress = nl
                .qdiscs()?
                .into_iter()
                .filter(|q| q.attributes.contains(&TcAttribute::Kind("ingress".into())))
                .map(|q| q.header.index as u32)
                .collect();
            let mut redirects = HashMap::new();
            for l in &links {
                let mut found = Vec::new();
                // A device without an ingress qdisc has no filters to list.
                for f in nl.ingress_filters(l.index).unwrap_or_default() {
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
