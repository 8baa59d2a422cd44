//! The tc plumbing between a CNI interface and its tap: an ingress qdisc on each, and on
//! each ingress a u32 filter redirecting every frame to the other (`mirred egress
//! redirect`).

#[cfg(test)]
use netlink_packet_core::NLM_F_DUMP;
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirror, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32, TcFilterU32Option, TcHandle, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;
use wisp_netlink::RouteSocket;

use super::{NetworkError, Result};

/// The ingress qdisc's handle (`ffff:`); its filters hang below it.
const INGRESS_HANDLE: TcHandle = TcHandle { major: 0xffff, minor: 0 };
/// Priority of the redirect filters.
const FILTER_PRIO: u32 = 1;
/// ETH_P_ALL: the filters see every protocol.
const ETH_P_ALL: u16 = 0x0003;

/// A tc request the kernel refused: names the interface, and the modules when the
/// kernel does not know the qdisc, classifier or action.
pub(super) fn tc_error(e: NetworkError, dev: &str) -> NetworkError {
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

pub(super) fn add_ingress_qdisc(nl: &mut RouteSocket, index: u32) -> Result<()> {
    let flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    nl.request("add ingress qdisc", RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(index)), flags)?;
    Ok(())
}

pub(super) fn del_ingress_qdisc(nl: &mut RouteSocket, index: u32) -> Result<()> {
    nl.request("delete ingress qdisc", RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)), NLM_F_ACK)?;
    Ok(())
}

pub(super) fn add_redirect(nl: &mut RouteSocket, from: u32, to: u32) -> Result<()> {
    let flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    nl.request("add mirred redirect filter", RouteNetlinkMessage::NewTrafficFilter(redirect_filter(from, to)), flags)?;
    Ok(())
}

#[cfg(test)]
pub(super) fn qdiscs(nl: &mut RouteSocket) -> Result<Vec<TcMessage>> {
    let answers =
        nl.request("list qdiscs", RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default()), NLM_F_DUMP)?;
    Ok(answers
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewQueueDiscipline(q) => Some(q),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
pub(super) fn ingress_filters(nl: &mut RouteSocket, index: u32) -> Result<Vec<TcMessage>> {
    let mut q = TcMessage::with_index(index as i32);
    q.header.parent = INGRESS_HANDLE;
    let answers = nl.request("list filters", RouteNetlinkMessage::GetTrafficFilter(q), NLM_F_DUMP)?;
    Ok(answers
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewTrafficFilter(f) => Some(f),
            _ => None,
        })
        .collect())
}
#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, Parseable};
    use netlink_packet_route::tc::TcMessageBuffer;

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
}
