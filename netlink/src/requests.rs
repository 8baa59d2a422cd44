//! The requests the shim and the agent both make: dumps of the namespace's links,
//! addresses and routes, a link's index by name, changing and deleting a link.

use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP};
use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::RouteNetlinkMessage;

use crate::{Result, RouteSocket};

impl RouteSocket {
    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<LinkMessage>> {
        let answers = self.request("list links", RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// The index of the link named `name`; None when there is none.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>> {
        Ok(self
            .links()?
            .into_iter()
            .find(|l| l.attributes.iter().any(|a| matches!(a, LinkAttribute::IfName(n) if n == name)))
            .map(|l| l.header.index))
    }

    /// Every address of the namespace, of every link.
    pub fn addresses(&mut self) -> Result<Vec<AddressMessage>> {
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

    /// Every route of the namespace, of every table.
    pub fn routes(&mut self) -> Result<Vec<RouteMessage>> {
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

    /// Changes link `index` (`op` names the change in errors): brings it up or down if
    /// `up` says so, and sets `attrs`.
    pub fn set_link(&mut self, op: &str, index: u32, up: Option<bool>, attrs: Vec<LinkAttribute>) -> Result<()> {
        self.request(op, RouteNetlinkMessage::SetLink(set_link_message(index, up, attrs)), NLM_F_ACK)?;
        Ok(())
    }

    pub fn del_link(&mut self, index: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        self.request("delete link", RouteNetlinkMessage::DelLink(m), NLM_F_ACK)?;
        Ok(())
    }
}

fn set_link_message(index: u32, up: Option<bool>, attrs: Vec<LinkAttribute>) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    if let Some(up) = up {
        m.header.change_mask = LinkFlags::Up;
        m.header.flags = if up { LinkFlags::Up } else { LinkFlags::empty() };
    }
    m.attributes = attrs;
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_changes_touch_only_what_is_asked() {
        let m = set_link_message(4, None, vec![LinkAttribute::Mtu(1400)]);
        assert_eq!((m.header.index, m.header.change_mask, m.header.flags), (4, LinkFlags::empty(), LinkFlags::empty()));
        assert_eq!(m.attributes, vec![LinkAttribute::Mtu(1400)]);
        let up = set_link_message(4, Some(true), Vec::new());
        assert_eq!((up.header.change_mask, up.header.flags), (LinkFlags::Up, LinkFlags::Up));
        let down = set_link_message(4, Some(false), Vec::new());
        assert_eq!((down.header.change_mask, down.header.flags), (LinkFlags::Up, LinkFlags::empty()));
    }

    /// Needs no privileges: every namespace has loopback.
    #[test]
    fn a_dump_of_links_finds_loopback() {
        let mut sock = RouteSocket::open().unwrap();
        let links = sock.links().unwrap();
        assert!(links.iter().any(|l| l.header.index == 1), "{links:?}");
    }

    /// Needs no privileges either: dumps are allowed to everyone.
    #[test]
    fn loopback_is_found_by_name_and_dumps_answer() {
        let mut sock = RouteSocket::open().unwrap();
        assert_eq!(sock.link_index("lo").unwrap(), Some(1));
        assert_eq!(sock.link_index("no-such-link0").unwrap(), None);
        let addresses = sock.addresses().unwrap();
        assert!(addresses.iter().all(|a| a.header.index != 0), "{addresses:?}");
        sock.routes().unwrap();
    }

    /// Root only: in a private network namespace of a test thread.
    #[test]
    #[ignore = "needs root for a network namespace; run as root with --ignored (make unit does)"]
    fn links_are_changed_and_deleted() {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) with a flag, no memory; namespaces are per thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "{}", std::io::Error::last_os_error());
            let mut sock = RouteSocket::open().unwrap();
            sock.set_link("set lo up", 1, Some(true), vec![LinkAttribute::Mtu(1500)]).unwrap();
            let lo = sock.links().unwrap().into_iter().find(|l| l.header.index == 1).unwrap();
            assert!(lo.header.flags.contains(LinkFlags::Up));
            assert!(lo.attributes.contains(&LinkAttribute::Mtu(1500)));
            assert!(sock.addresses().unwrap().iter().any(|a| a.header.index == 1));
            assert!(!sock.routes().unwrap().is_empty());
            let e = sock.del_link(999).unwrap_err();
            assert_eq!(e.errno, libc::ENODEV, "{e}");
        })
        .join()
        .unwrap();
    }
}
