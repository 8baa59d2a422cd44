//! Guest network configuration over rtnetlink (the guest has no `ip` binary):
//! UpdateInterface finds the interface by MAC, renames it, sets the MTU, replaces its
//! addresses and brings it up; UpdateRoutes adds routes (link routes before gateway
//! routes, so gateways are reachable when their routes go in).
//!
//! Trusts: nothing in requests (addresses, prefixes and names are parsed and checked
//! here); the kernel's netlink answers.

use std::net::IpAddr;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use wisp_netlink::{NetlinkError, RouteSocket};
use wisp_protocols::agent::{Interface, IpAddress, Route};

use crate::sandbox::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{0}")]
    Invalid(String),
    #[error("no guest interface has MAC address {0} (is the VMM's net device attached?)")]
    NoSuchMac(String),
    #[error("no guest interface is named {0:?}")]
    NoSuchDevice(String),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

impl NetworkError {
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Invalid(_) => ErrorClass::InvalidArgument,
            Self::NoSuchMac(_) | Self::NoSuchDevice(_) => ErrorClass::NotFound,
            Self::Netlink(_) => ErrorClass::Internal,
        }
    }
}

type Result<T> = std::result::Result<T, NetworkError>;

/// "10.0.0.0/8" -> (addr, 8); "" -> None (default route).
pub fn parse_cidr(s: &str) -> Result<Option<(IpAddr, u8)>> {
    if s.is_empty() || s == "default" {
        return Ok(None);
    }
    let bad = || NetworkError::Invalid(format!("route destination {s:?} is not a CIDR like 10.0.0.0/24"));
    let (a, p) = s.split_once('/').unwrap_or((s, ""));
    let addr: IpAddr = a.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = if p.is_empty() { max } else { p.parse::<u8>().map_err(|_| bad())? };
    if prefix > max {
        return Err(bad());
    }
    Ok(Some((addr, prefix)))
}

fn parse_address(a: &IpAddress) -> Result<(IpAddr, u8)> {
    let addr: IpAddr =
        a.address.parse().map_err(|_| NetworkError::Invalid(format!("{:?} is not an IP address", a.address)))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    if a.prefix_len > max {
        return Err(NetworkError::Invalid(format!("prefix length {} is too long for {addr}", a.prefix_len)));
    }
    Ok((addr, a.prefix_len as u8))
}

fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\0', ':']) {
        return Err(NetworkError::Invalid(format!(
            "interface name {name:?} is not valid (1-15 bytes, no '/', ':' or spaces)"
        )));
    }
    Ok(())
}

fn family(a: &IpAddr) -> AddressFamily {
    if a.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn route_addr(a: IpAddr) -> RouteAddress {
    match a {
        IpAddr::V4(v) => RouteAddress::Inet(v),
        IpAddr::V6(v) => RouteAddress::Inet6(v),
    }
}

/// The link with MAC address `mac`, if any.
fn link_by_mac(nl: &mut RouteSocket, mac: &[u8; 6]) -> Result<Option<LinkMessage>> {
    Ok(nl
        .links()?
        .into_iter()
        .find(|l| l.attributes.iter().any(|a| matches!(a, LinkAttribute::Address(m) if m == mac))))
}

fn index_of(nl: &mut RouteSocket, name: &str) -> Result<u32> {
    nl.link_index(name)?.ok_or_else(|| NetworkError::NoSuchDevice(name.into()))
}

/// The addresses of link `index`.
fn addresses(nl: &mut RouteSocket, index: u32) -> Result<Vec<AddressMessage>> {
    Ok(nl.addresses()?.into_iter().filter(|a| a.header.index == index).collect())
}

fn add_address(nl: &mut RouteSocket, index: u32, addr: IpAddr, prefix: u8) -> Result<()> {
    let mut m = AddressMessage::default();
    m.header.family = family(&addr);
    m.header.prefix_len = prefix;
    m.header.index = index;
    m.header.scope = AddressScope::Universe;
    m.attributes.push(AddressAttribute::Local(addr));
    m.attributes.push(AddressAttribute::Address(addr));
    nl.request("add address", RouteNetlinkMessage::NewAddress(m), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)?;
    Ok(())
}

/// An UpdateInterface request, checked.
#[derive(Debug, PartialEq)]
pub struct CheckedInterface {
    /// The MAC the interface gets.
    pub mac: [u8; 6],
    /// The MAC it is found by: the one the VMM gave the NIC (`device_mac`, or `mac`).
    pub device_mac: [u8; 6],
    /// Its addresses with their prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
}

/// An UpdateInterface request checked (the shim's word is not trusted blindly): the MACs
/// it names and its addresses, or what is wrong with it. Touches nothing.
pub fn check_interface(iface: &Interface) -> Result<CheckedInterface> {
    let parse = |m: &str| wisp_protocols::mac::parse_mac(m).map_err(NetworkError::Invalid);
    let mac = parse(&iface.mac)?;
    let device_mac = if iface.device_mac.is_empty() { mac } else { parse(&iface.device_mac)? };
    if mac[0] & 1 != 0 {
        return Err(NetworkError::Invalid(format!("MAC {} is a multicast address", iface.mac)));
    }
    if !iface.name.is_empty() {
        check_ifname(&iface.name)?;
    }
    if iface.mtu != 0 && !(68..=65535).contains(&iface.mtu) {
        return Err(NetworkError::Invalid(format!("MTU {} is out of range 68-65535", iface.mtu)));
    }
    let addresses = iface.addresses.iter().map(parse_address).collect::<Result<_>>()?;
    Ok(CheckedInterface { mac, device_mac, addresses })
}

pub fn update_interface(iface: &Interface) -> Result<Interface> {
    let CheckedInterface { mac, device_mac, addresses: addrs } = check_interface(iface)?;

    let mut nl = RouteSocket::open()?;
    let link = link_by_mac(&mut nl, &device_mac)?.ok_or_else(|| {
        NetworkError::NoSuchMac(if iface.device_mac.is_empty() { iface.mac.clone() } else { iface.device_mac.clone() })
    })?;
    let index = link.header.index;
    nl.set_link("set link down", index, Some(false), Vec::new())?;
    let mut attrs = Vec::new();
    // A clone of a template has the template's MAC: the pod's own replaces it (the
    // virtio-net device takes it without telling the VMM, whose tap does not care).
    if device_mac != mac {
        attrs.push(LinkAttribute::Address(mac.to_vec()));
    }
    if !iface.name.is_empty() {
        attrs.push(LinkAttribute::IfName(iface.name.clone()));
    }
    if iface.mtu != 0 {
        attrs.push(LinkAttribute::Mtu(iface.mtu));
    }
    if !attrs.is_empty() {
        nl.set_link("set name, MAC or MTU", index, None, attrs)?;
    }
    for old in addresses(&mut nl, index)? {
        if old.header.scope == AddressScope::Link {
            continue;
        }
        nl.request("remove old address", RouteNetlinkMessage::DelAddress(old), NLM_F_ACK)?;
    }
    for (a, p) in &addrs {
        add_address(&mut nl, index, *a, *p)?;
    }
    nl.set_link("set link up", index, Some(true), Vec::new())?;
    log::info!("configured interface {} ({}) with {} addresses", iface.name, iface.mac, addrs.len());
    Ok(iface.clone())
}

/// A route of an UpdateRoutes request, checked.
pub struct CheckedRoute<'a> {
    r: &'a Route,
    dest: Option<(IpAddr, u8)>,
    gw: Option<IpAddr>,
    src: Option<IpAddr>,
}

/// An UpdateRoutes request checked: its routes parsed, link routes first (gateway routes
/// need their gateway reachable), or what is wrong with it. Touches nothing.
pub fn check_routes(routes: &[Route]) -> Result<Vec<CheckedRoute<'_>>> {
    let mut parsed = Vec::new();
    for r in routes {
        let ip = |s: &str, what: &str| -> Result<Option<IpAddr>> {
            if s.is_empty() {
                return Ok(None);
            }
            s.parse().map(Some).map_err(|_| NetworkError::Invalid(format!("route {what} {s:?} is not an IP address")))
        };
        if r.scope > 255 {
            return Err(NetworkError::Invalid(format!("route scope {} is out of range", r.scope)));
        }
        if !r.device.is_empty() {
            check_ifname(&r.device)?;
        }
        parsed.push(CheckedRoute {
            r,
            dest: parse_cidr(&r.destination)?,
            gw: ip(&r.gateway, "gateway")?,
            src: ip(&r.source, "source")?,
        });
    }
    parsed.sort_by_key(|p| p.gw.is_some());
    Ok(parsed)
}

pub fn update_routes(routes: &[Route]) -> Result<Vec<Route>> {
    let parsed = check_routes(routes)?;
    let mut nl = RouteSocket::open()?;
    for p in &parsed {
        let mut m = RouteMessage::default();
        let fam = p.dest.map(|(a, _)| a).or(p.gw).or(p.src).map(|a| family(&a)).unwrap_or(AddressFamily::Inet);
        m.header.address_family = fam;
        m.header.table = libc::RT_TABLE_MAIN;
        m.header.protocol = RouteProtocol::Boot;
        m.header.kind = RouteType::Unicast;
        m.header.scope = match (p.r.scope, p.gw) {
            (0, None) => RouteScope::Link,
            (0, Some(_)) => RouteScope::Universe,
            (s, _) => RouteScope::from(s as u8),
        };
        if let Some((a, len)) = p.dest {
            m.header.destination_prefix_length = len;
            m.attributes.push(RouteAttribute::Destination(route_addr(a)));
        }
        if let Some(g) = p.gw {
            m.attributes.push(RouteAttribute::Gateway(route_addr(g)));
        }
        if let Some(s) = p.src {
            m.attributes.push(RouteAttribute::PrefSource(route_addr(s)));
        }
        if !p.r.device.is_empty() {
            let idx = index_of(&mut nl, &p.r.device)?;
            m.attributes.push(RouteAttribute::Oif(idx));
        }
        if p.r.metric != 0 {
            m.attributes.push(RouteAttribute::Priority(p.r.metric));
        }
        nl.request("add route", RouteNetlinkMessage::NewRoute(m), NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE)?;
    }
    log::info!("configured {} routes", parsed.len());
    Ok(routes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::LinkFlags;

    /// Configures `lo` in a private network namespace of a test thread (root only).
    /// Ignored by default (libtest cannot report a skip): `make unit` runs it as root
    /// with `--ignored`.
    #[test]
    #[ignore = "needs root for a network namespace; run as root with --ignored (make unit does)"]
    fn configures_an_interface_and_routes_in_a_private_netns() {
        let t = std::thread::spawn(|| {
            // Namespaces are per thread: this one gets its own network namespace.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
            let lo = Interface {
                name: "lo".into(),
                mac: "00:00:00:00:00:00".into(),
                mtu: 1500,
                addresses: vec![IpAddress { address: "10.1.2.3".into(), prefix_len: 24, ..Default::default() }],
                ..Default::default()
            };
            update_interface(&lo).expect("UpdateInterface on lo");
            let mut nl = RouteSocket::open().unwrap();
            let idx = index_of(&mut nl, "lo").unwrap();
            let addrs = addresses(&mut nl, idx).unwrap();
            assert!(addrs.iter().any(|a| a.header.prefix_len == 24
                && a.attributes
                    .iter()
                    .any(|x| matches!(x, AddressAttribute::Address(ip) if ip.to_string() == "10.1.2.3"))));
            let mtu = nl.links().unwrap().into_iter().find(|l| l.header.index == idx).unwrap();
            assert!(mtu.attributes.iter().any(|a| matches!(a, LinkAttribute::Mtu(1500))));
            assert!(mtu.header.flags.contains(LinkFlags::Up));
            let routes = vec![
                Route { destination: "".into(), gateway: "10.1.2.1".into(), device: "lo".into(), ..Default::default() },
                Route { destination: "10.9.0.0/16".into(), device: "lo".into(), ..Default::default() },
            ];
            update_routes(&routes).expect("UpdateRoutes");
            let missing = Interface { mac: "02:ff:ff:ff:ff:ff".into(), ..Default::default() };
            assert!(matches!(update_interface(&missing), Err(NetworkError::NoSuchMac(_))));
            let bad_dev = Route { destination: "10.8.0.0/16".into(), device: "nope0".into(), ..Default::default() };
            assert!(matches!(update_routes(&[bad_dev]), Err(NetworkError::NoSuchDevice(_))));
        });
        t.join().unwrap();
    }

    /// A clone of a template: the NIC has the template's MAC and gets the pod's (root
    /// only, a veth in a private network namespace; `make unit` runs it).
    #[test]
    #[ignore = "needs root for a network namespace; run as root with --ignored (make unit does)"]
    fn a_nic_found_by_its_device_mac_gets_the_pod_s_mac_and_name() {
        let t = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
            // A child forked by this thread is in its network namespace.
            let ip = std::process::Command::new("ip")
                .args(["link", "add", "tmpl0", "address", "02:77:69:73:70:00", "type", "veth", "peer", "name", "tmpl1"])
                .status()
                .expect("ip");
            assert!(ip.success(), "ip link add: {ip}");
            let iface = Interface {
                name: "eth0".into(),
                mac: "0a:58:0a:58:00:07".into(),
                device_mac: "02:77:69:73:70:00".into(),
                addresses: vec![IpAddress { address: "10.88.0.7".into(), prefix_len: 16, ..Default::default() }],
                ..Default::default()
            };
            update_interface(&iface).expect("UpdateInterface by device MAC");
            let mut nl = RouteSocket::open().unwrap();
            let idx = index_of(&mut nl, "eth0").unwrap();
            let link = nl.links().unwrap().into_iter().find(|l| l.header.index == idx).unwrap();
            let want = [0x0a, 0x58, 0x0a, 0x58, 0x00, 0x07].to_vec();
            assert!(link.attributes.iter().any(|a| matches!(a, LinkAttribute::Address(m) if *m == want)));
            // The template's MAC is gone: a second request by it finds nothing.
            assert!(matches!(update_interface(&iface), Err(NetworkError::NoSuchMac(m)) if m == "02:77:69:73:70:00"));
        });
        t.join().unwrap();
    }

    #[test]
    fn interface_requests_are_checked_before_anything_is_touched() {
        let i = |mac: &str, device_mac: &str| Interface {
            mac: mac.into(),
            device_mac: device_mac.into(),
            ..Default::default()
        };
        let c = check_interface(&i("0a:58:0a:58:00:07", "")).unwrap();
        assert_eq!(c.device_mac, c.mac, "no device MAC: the NIC has the pod's");
        let c = check_interface(&i("0a:58:0a:58:00:07", "02:77:69:73:70:00")).unwrap();
        assert_eq!(c.device_mac, [0x02, 0x77, 0x69, 0x73, 0x70, 0]);
        for (mac, dev, want) in [
            ("01:00:5e:00:00:01", "", "multicast"),
            ("0a:58:0a:58:00:07", "02:77:69:73:70", "02:77:69:73:70"),
            ("nope", "", "nope"),
        ] {
            let e = check_interface(&i(mac, dev)).unwrap_err().to_string();
            assert!(e.contains(want), "{mac} {dev}: {e}");
        }
    }

    #[test]
    fn cidrs_parse() {
        assert_eq!(parse_cidr("").unwrap(), None);
        assert_eq!(parse_cidr("10.88.0.0/16").unwrap(), Some(("10.88.0.0".parse().unwrap(), 16)));
        assert_eq!(parse_cidr("10.88.0.1").unwrap(), Some(("10.88.0.1".parse().unwrap(), 32)));
        assert_eq!(parse_cidr("fd00::/64").unwrap(), Some(("fd00::".parse().unwrap(), 64)));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nope/8").is_err());
    }

    #[test]
    fn interface_requests_are_checked_before_netlink() {
        let mut i = Interface { name: "eth0".into(), mac: "02:00:00:00:00:+1".into(), ..Default::default() };
        assert!(matches!(update_interface(&i), Err(NetworkError::Invalid(e)) if e.contains("is not a MAC address")));
        i.mac = "02:00:00:00:00:01".into();
        i.mtu = 10;
        assert!(matches!(update_interface(&i), Err(NetworkError::Invalid(_))));
        i.mtu = 1500;
        i.name = "a/b".into();
        assert!(matches!(update_interface(&i), Err(NetworkError::Invalid(_))));
        i.name = "eth0".into();
        i.addresses.push(IpAddress { address: "10.0.0.1".into(), prefix_len: 40, ..Default::default() });
        assert!(matches!(update_interface(&i), Err(NetworkError::Invalid(_))));
        let r = Route { destination: "10.0.0.0/8".into(), gateway: "x".into(), ..Default::default() };
        assert!(matches!(update_routes(&[r]), Err(NetworkError::Invalid(_))));
    }

    /// A bad route anywhere in the request refuses all of it before any is added (a bad
    /// device used to be found only when its route's turn came); link routes go first.
    #[test]
    fn route_requests_are_checked_whole_before_netlink() {
        let good = Route { destination: "10.0.0.0/8".into(), device: "eth0".into(), ..Default::default() };
        let via = Route { gateway: "10.0.0.1".into(), ..Default::default() };
        let bad_dev = Route { destination: "10.1.0.0/16".into(), device: "a b".into(), ..Default::default() };
        let e = check_routes(&[good.clone(), bad_dev]).err().expect("a bad device was accepted");
        assert!(matches!(&e, NetworkError::Invalid(m) if m.contains("\"a b\"")), "{e}");
        let scope = Route { scope: 256, ..good.clone() };
        assert!(matches!(check_routes(&[scope]), Err(NetworkError::Invalid(_))));
        let routes = [via, good];
        let checked = check_routes(&routes).unwrap();
        assert_eq!(checked.iter().map(|r| r.gw.is_some()).collect::<Vec<_>>(), [false, true]);
    }
}
