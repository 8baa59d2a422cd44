//! The links and addresses of the pod's namespace, which of them the guest gets, and the
//! shim's changes to links (its taps).

use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkLayerType, LinkMessage,
};
use wisp_netlink::RouteSocket;
use wisp_protocols::agent::IpAddress;

use super::{NetworkError, Result};

/// What the shim needs to know about a link in the pod's namespace.
#[derive(Debug, Clone, Default)]
pub(super) struct HostLink {
    pub(super) index: u32,
    pub(super) name: String,
    pub(super) mac: Vec<u8>,
    pub(super) mtu: u32,
    pub(super) up: bool,
    pub(super) loopback: bool,
    pub(super) ether: bool,
    pub(super) tun: bool,
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
    pub(super) fn unusable(&self) -> Option<&'static str> {
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

pub(super) fn format_mac(mac: &[u8]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// A global address of an interface for the guest (link-local and host addresses are
/// the guest kernel's own business).
pub(super) fn guest_address(a: &AddressMessage) -> Option<IpAddress> {
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
/// The index of the link `name`; ENODEV when there is none.
pub(super) fn index_of(nl: &mut RouteSocket, name: &str) -> Result<u32> {
    nl.link_index(name)?.ok_or_else(|| NetworkError::Netlink {
        op: format!("finding {name}"),
        errno: libc::ENODEV,
        msg: "no such device".into(),
    })
}

/// Sets the MTU and brings the link up.
pub(super) fn set_up(nl: &mut RouteSocket, index: u32, mtu: u32) -> Result<()> {
    let attrs = if mtu != 0 { vec![LinkAttribute::Mtu(mtu)] } else { Vec::new() };
    Ok(nl.set_link("set tap MTU and up", index, Some(true), attrs)?)
}

/// `ip link set X addrgenmode none` (while the link is down).
pub(super) fn no_ipv6_address(nl: &mut RouteSocket, index: u32) -> Result<()> {
    let mode = AfSpecInet6::AddrGenMode(In6AddrGenMode::None);
    let attrs = vec![LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![mode])])];
    Ok(nl.set_link("set addrgenmode none", index, None, attrs)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

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
}
