//! A synchronous rtnetlink client: one request at a time, answers collected until the
//! kernel's DONE or ACK. See README.md. Also the opening of tap queues (`tap`), which the
//! shim and the VMM share.
//!
//! Trusts: the kernel's answers (they come from the namespace's own kernel), but still
//! decodes them without panicking: a malformed datagram is an error.

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

mod requests;
pub mod tap;

/// Flags of the ack/error messages (netlink(7)): the request was truncated in the echo,
/// extended-ack attributes follow.
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
/// Extended-ack attribute carrying the kernel's error text.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// A failed netlink operation: what was asked (`op`), the errno (0 when the failure was
/// not an errno, e.g. an answer that does not decode) and the text to show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("netlink {op}: {msg}")]
pub struct NetlinkError {
    pub op: String,
    pub errno: i32,
    pub msg: String,
}

impl NetlinkError {
    fn io(op: &str, e: &std::io::Error) -> Self {
        Self { op: op.to_string(), errno: e.raw_os_error().unwrap_or(0), msg: e.to_string() }
    }
}

pub type Result<T> = std::result::Result<T, NetlinkError>;

/// A blocking rtnetlink socket, bound to the network namespace of the thread that
/// opened it.
pub struct RouteSocket {
    sock: Socket,
    seq: u32,
}

impl RouteSocket {
    pub fn open() -> Result<Self> {
        let err = |e: std::io::Error| NetlinkError::io("socket", &e);
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(err)?;
        sock.bind_auto().map_err(err)?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(err)?;
        // Error texts from the kernel, and short echoes; older kernels lack them: fine.
        let _ = sock.set_ext_ack(true);
        let _ = sock.set_cap_ack(true);
        Ok(Self { sock, seq: 0 })
    }

    /// Sends one request (`flags` besides NLM_F_REQUEST: NLM_F_DUMP for a dump,
    /// NLM_F_ACK for a change) and collects the answers until DONE or the ACK.
    pub fn request(&mut self, op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>> {
        let err = |errno: i32, msg: String| NetlinkError { op: op.to_string(), errno, msg };
        self.seq = self.seq.wrapping_add(1);
        let buf = encode(msg, flags, self.seq);
        self.sock.send(&buf, 0).map_err(|e| NetlinkError::io(op, &e))?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full().map_err(|e| NetlinkError::io(op, &e))?;
            for msg in decode(&data).map_err(|e| err(0, e))? {
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(out),
                        Some(code) => {
                            let errno = -code.get();
                            let mut text = std::io::Error::from_raw_os_error(errno).to_string();
                            if let Some(ext) = ext_ack_message(msg.header.flags, &e.header) {
                                text = format!("{ext} ({text})");
                            }
                            return Err(err(errno, text));
                        }
                    },
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
            if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 {
                return Ok(out);
            }
        }
    }
}

/// Serializes one request (what `request` sends; public for tests of message builders).
pub fn encode(msg: RouteNetlinkMessage, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = seq;
    let mut nl = NetlinkMessage::new(header, NetlinkPayload::from(msg));
    nl.finalize();
    let mut buf = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut buf);
    buf
}

/// Splits one datagram from the kernel into its messages.
pub fn decode(data: &[u8]) -> std::result::Result<Vec<NetlinkMessage<RouteNetlinkMessage>>, String> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < data.len() {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..]).map_err(|e| e.to_string())?;
        let len = msg.header.length as usize;
        if len == 0 {
            break;
        }
        off += (len + 3) & !3;
        out.push(msg);
    }
    Ok(out)
}

/// The kernel's error text from an error message's payload (the echoed request, whole
/// or capped to its header, then extended-ack attributes), if it sent one.
fn ext_ack_message(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let echoed =
        if flags & NLM_F_CAPPED != 0 { 16 } else { u32::from_ne_bytes(payload.get(0..4)?.try_into().ok()?) as usize };
    let mut off = (echoed + 3) & !3;
    while off + 4 <= payload.len() {
        let len = u16::from_ne_bytes([payload[off], payload[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([payload[off + 2], payload[off + 3]]) & 0x3fff;
        if len < 4 || off + len > payload.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = String::from_utf8_lossy(&payload[off + 4..off + len]);
            let text = text.trim_end_matches('\0').trim();
            return (!text.is_empty()).then(|| text.to_string());
        }
        off += (len + 3) & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::link::LinkMessage;

    #[test]
    fn kernel_error_texts_are_read_from_extended_acks() {
        // Capped echo (16 bytes of the request's header), then NLMSGERR_ATTR_MSG.
        let mut payload = vec![0u8; 16];
        let text = b"Specified qdisc kind is unknown\0";
        payload.extend(((4 + text.len()) as u16).to_ne_bytes());
        payload.extend(NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend(text);
        let flags = NLM_F_CAPPED | NLM_F_ACK_TLVS;
        assert_eq!(ext_ack_message(flags, &payload).as_deref(), Some("Specified qdisc kind is unknown"));
        assert_eq!(ext_ack_message(NLM_F_CAPPED, &payload), None);
        // Not capped: the whole request (its length first) comes before the attributes.
        let mut whole = vec![0u8; 20];
        whole[0..4].copy_from_slice(&20u32.to_ne_bytes());
        whole.extend(&payload[16..]);
        assert_eq!(ext_ack_message(NLM_F_ACK_TLVS, &whole).as_deref(), Some("Specified qdisc kind is unknown"));
        // Truncated or garbage attributes are ignored.
        assert_eq!(ext_ack_message(flags, &payload[..20]), None);
        assert_eq!(ext_ack_message(NLM_F_ACK_TLVS, &[0xff; 3]), None);
    }

    #[test]
    fn requests_round_trip_and_garbage_does_not_decode() {
        let buf = encode(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP, 7);
        let msgs = decode(&buf).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].header.sequence_number, 7);
        assert_eq!(msgs[0].header.flags, NLM_F_REQUEST | NLM_F_DUMP);
        assert!(decode(&[0xff; 7]).is_err());
    }
}
