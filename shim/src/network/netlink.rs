//! The rtnetlink socket of the pod's namespace, with the shim's requests (tc ones in
//! `tc`).

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{AfSpecInet6, AfSpecUnspec, In6AddrGenMode, LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::RouteNetlinkMessage;
use wisp_netlink::RouteSocket;

use super::links::HostLink;
use super::{NetworkError, Result};

/// The rtnetlink socket of the namespace it was opened in, with the shim's requests.
pub(super) struct Netlink(RouteSocket);

impl Netlink {
    pub(super) fn open() -> Result<Self> {
        Ok(Self(RouteSocket::open()?))
    }

    pub(super) fn request(
        &mut self,
        op: &str,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>> {
        Ok(self.0.request(op, msg, flags)?)
    }

    pub(super) fn links(&mut self) -> Result<Vec<LinkMessage>> {
        Ok(self.0.links()?)
    }

    pub(super) fn index_of(&mut self, name: &str) -> Result<u32> {
        self.links()?.iter().map(HostLink::from).find(|l| l.name == name).map(|l| l.index).ok_or_else(|| {
            NetworkError::Netlink { op: format!("finding {name}"), errno: libc::ENODEV, msg: "no such device".into() }
        })
    }

    pub(super) fn addresses(&mut self) -> Result<Vec<AddressMessage>> {
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

    pub(super) fn routes(&mut self) -> Result<Vec<RouteMessage>> {
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
    pub(super) fn set_up(&mut self, index: u32, mtu: u32) -> Result<()> {
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
    pub(super) fn no_ipv6_address(&mut self, index: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        let mode = AfSpecInet6::AddrGenMode(In6AddrGenMode::None);
        m.attributes.push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![mode])]));
        self.request("set addrgenmode none", RouteNetlinkMessage::SetLink(m), NLM_F_ACK)?;
        Ok(())
    }

    pub(super) fn del_link(&mut self, index: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.request("delete link", RouteNetlinkMessage::DelLink(m), NLM_F_ACK)?;
        Ok(())
    }
}
