//! The routes of the pod's namespace as the guest gets them.

use std::collections::HashMap;
use std::net::IpAddr;

use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType};
use wisp_protocols::agent::Route;

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
pub(super) fn guest_route(
    m: &RouteMessage,
    devices: &HashMap<u32, String>,
) -> std::result::Result<Option<Route>, String> {
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
#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NLM_F_DUMP;
    use netlink_packet_route::route::RouteScope;
    use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
    use std::net::{Ipv4Addr, Ipv6Addr};

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
}
