//! One vsock stream between a guest socket and a host Unix stream: its state machine
//! (virtio 1.2 §5.10.6.4-6) and credit-based flow control in both directions.
//!
//! Guest -> host: the guest may send at most the `buf_alloc` we advertise beyond what we
//! forwarded (`fwd_cnt`); what the host stream cannot take at once is buffered, which the
//! credit bounds; a guest that overruns it is reset. We tell the guest about freed space
//! (CREDIT_UPDATE) before it would stall.
//! Host -> guest: we read the host stream only when the muxer has a guest RX buffer for
//! us, and never more than the guest's credit (`buf_alloc - (tx_cnt - fwd_cnt)` from its
//! latest header). Without credit we stop watching the stream instead of polling it.
//!
//! Trusts neither side: every guest header is checked against the state; host I/O
//! errors reset the connection. The stream is non-blocking; nothing here waits.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::packet::{
    PacketHeader, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
    SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::unix::{peer_hung_up, send_nosignal};
use super::{Timeouts, VSOCK_HOST_CID};

/// Receive buffer advertised to the guest per connection (`buf_alloc`): guest data the
/// host has not read yet is held up to this size.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// When the credit the guest last heard of drops below this, tell it about freed space...
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 2;
/// ... once at least this much was freed, or everything was.
const CREDIT_UPDATE_MIN_STEP: u32 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: the REQUEST is queued for or sent to the guest; waiting for its
    /// RESPONSE (or RST) until the deadline.
    LocalInit,
    /// Data flows; either direction may already be shut down.
    Established,
    /// One side closed completely; waiting until the deadline for the other to finish
    /// (the guest's RST, or the host reading what is still buffered for it).
    Closing,
    /// Done: the muxer drops the connection, and sends the guest an RST if `reset_guest`.
    Closed { reset_guest: bool },
}

/// Why a connection was reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("guest sent op {op} in state {state:?}")]
    UnexpectedOp { op: u16, state: ConnState },
    #[error("guest sent {excess} bytes beyond the {CONN_BUF_SIZE}-byte credit it was given")]
    CreditExceeded { excess: usize },
    #[error("guest sent data after shutting down its sending side")]
    DataAfterShutdown,
    #[error("host stream failed: {0}")]
    HostIo(io::Error),
    #[error("guest did not answer the connection request in time")]
    ConnectTimeout,
    #[error("peer did not finish closing in time")]
    CloseTimeout,
}

impl ConnectionError {
    /// True if the guest broke the protocol (worth a warning), false for ordinary
    /// host-side or timing events.
    pub fn is_guest_fault(&self) -> bool {
        matches!(self, Self::UnexpectedOp { .. } | Self::CreditExceeded { .. } | Self::DataAfterShutdown)
    }
}

/// Control packets owed to the guest.
#[derive(Debug, Default)]
struct PendingControl {
    request: bool,
    response: bool,
    credit_update: bool,
    shutdown_flags: u32,
}

pub struct HostConnection {
    stream: UnixStream,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    state: ConnState,
    deadline: Option<Instant>,
    close_timeout: Duration,
    reset_reason: Option<ConnectionError>,
    pending: PendingControl,

    // Guest -> host.
    /// `OK <port>\n` not yet written to the host (not guest data: outside the credit).
    reply: Vec<u8>,
    /// Guest data the host stream has not taken yet; at most `CONN_BUF_SIZE`.
    to_host: VecDeque<u8>,
    /// Bytes received from the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes of those written to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as of the last header we sent the guest.
    fwd_cnt_told: Wrapping<u32>,
    guest_shut_send: bool,
    guest_shut_recv: bool,
    host_write_shut: bool,

    // Host -> guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// The host stream reported data (or EOF) not yet read.
    readable: bool,
    host_eof: bool,

    /// What the event loop watches on `stream` (`None`: not registered). Kept by the muxer.
    pub(super) registered: Option<EventSet>,
}

impl HostConnection {
    /// A connection a host client asked for with `CONNECT <peer_port>`: the REQUEST to
    /// the guest is queued.
    pub fn new_local(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        timeouts: &Timeouts,
        now: Instant,
    ) -> Self {
        let mut conn = Self::new(stream, guest_cid, local_port, peer_port, ConnState::LocalInit, timeouts);
        conn.pending.request = true;
        conn.deadline = Some(now + timeouts.connect);
        conn
    }

    /// A connection the guest asked for with `request`, whose host side is `stream`:
    /// the RESPONSE is queued.
    pub fn new_peer(stream: UnixStream, request: &PacketHeader, timeouts: &Timeouts) -> Self {
        let mut conn = Self::new(
            stream,
            request.src_cid,
            request.dst_port,
            request.src_port,
            ConnState::Established,
            timeouts,
        );
        conn.pending.response = true;
        conn.peer_buf_alloc = request.buf_alloc;
        conn.peer_fwd_cnt = Wrapping(request.fwd_cnt);
        conn
    }

    fn new(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        state: ConnState,
        timeouts: &Timeouts,
    ) -> Self {
        Self {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state,
            deadline: None,
            close_timeout: timeouts.close,
            reset_reason: None,
            pending: PendingControl::default(),
            reply: Vec::new(),
            to_host: VecDeque::new(),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            guest_shut_send: false,
            guest_shut_recv: false,
            host_write_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            readable: false,
            host_eof: false,
            registered: None,
        }
    }

    pub fn state(&self) -> ConnState {
        self.state
    }

    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    pub fn take_reset_reason(&mut self) -> Option<ConnectionError> {
        self.reset_reason.take()
    }

    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    fn is_closed(&self) -> bool {
        matches!(self.state, ConnState::Closed { .. })
    }

    /// A header from our end of this connection, carrying our current credit.
    pub fn header(&self, op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// `header`, for a packet that is actually sent: the guest now knows our `fwd_cnt`.
    fn outgoing(&mut self, op: u16) -> PacketHeader {
        self.fwd_cnt_told = self.fwd_cnt;
        self.pending.credit_update = false;
        self.header(op)
    }

    /// How many bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub((self.tx_cnt - self.peer_fwd_cnt).0)
    }

    fn can_read_host(&self) -> bool {
        matches!(self.state, ConnState::Established) && !self.host_eof && !self.guest_shut_recv
    }

    fn has_output(&self) -> bool {
        !self.reply.is_empty() || !self.to_host.is_empty()
    }

    fn data_for_guest(&self) -> bool {
        self.readable && self.can_read_host() && self.peer_credit() > 0
    }

    /// True if `next_packet` has something to give the guest.
    pub fn has_pending_rx(&self) -> bool {
        match self.state {
            ConnState::Closed { .. } => false,
            ConnState::LocalInit => self.pending.request,
            ConnState::Established | ConnState::Closing => {
                self.pending.response
                    || self.pending.credit_update
                    || self.pending.shutdown_flags != 0
                    || self.data_for_guest()
            }
        }
    }

    /// What the event loop should watch on the host stream.
    pub fn wanted_events(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.is_closed() {
            return events;
        }
        if self.can_read_host() && !self.readable && self.peer_credit() > 0 {
            events |= EventSet::IN;
        }
        if self.has_output() {
            events |= EventSet::OUT;
        }
        events
    }

    pub fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Ends the connection; the host stream is closed when the muxer drops it.
    fn close(&mut self, reset_guest: bool) {
        self.state = ConnState::Closed { reset_guest };
        self.deadline = None;
        self.pending = PendingControl::default();
        self.to_host = VecDeque::new();
        self.reply = Vec::new();
        self.readable = false;
    }

    /// The event loop cannot watch the host stream: the connection cannot work.
    pub fn fail_host(&mut self, error: io::Error) {
        self.reset(ConnectionError::HostIo(error));
    }

    fn reset(&mut self, reason: ConnectionError) {
        self.reset_reason = Some(reason);
        self.close(true);
    }

    /// Closes once nothing can flow any more: the guest sends nothing, everything it sent
    /// reached the host, and the host sends nothing or the guest takes nothing.
    fn check_finished(&mut self) {
        if matches!(self.state, ConnState::Established | ConnState::Closing)
            && self.guest_shut_send
            && !self.has_output()
            && (self.host_eof || self.guest_shut_recv)
        {
            self.close(true);
        }
    }

    /// A packet the guest sent on this connection (addresses already matched).
    pub fn on_guest_packet(&mut self, hdr: &PacketHeader, data: &[u8], now: Instant) {
        if self.is_closed() {
            return;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match (self.state, hdr.op) {
            // Refused (nobody listens on that guest port) or aborted: nothing to answer.
            (_, OP_RST) => self.close(false),
            (ConnState::LocalInit, OP_RESPONSE) => {
                self.state = ConnState::Established;
                self.deadline = None;
                self.reply = format!("OK {}\n", self.local_port).into_bytes();
                self.flush_to_host();
            }
            (ConnState::Established | ConnState::Closing, OP_RW) => self.receive_data(data),
            (ConnState::Established | ConnState::Closing, OP_CREDIT_UPDATE) => {}
            (ConnState::Established | ConnState::Closing, OP_CREDIT_REQUEST) => {
                self.pending.credit_update = true;
            }
            (ConnState::Established | ConnState::Closing, OP_SHUTDOWN) => self.guest_shutdown(hdr.flags, now),
            (state, op) => self.reset(ConnectionError::UnexpectedOp { op, state }),
        }
    }

    fn receive_data(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.guest_shut_send {
            return self.reset(ConnectionError::DataAfterShutdown);
        }
        // What we hold is exactly what the guest used of its credit.
        let held = self.to_host.len().saturating_add(data.len());
        if held > CONN_BUF_SIZE as usize {
            return self.reset(ConnectionError::CreditExceeded { excess: held - CONN_BUF_SIZE as usize });
        }
        // `data` is at most 64 KiB.
        self.rx_cnt += Wrapping(u32::try_from(data.len()).unwrap_or(u32::MAX));
        let mut rest = data;
        if !self.has_output() {
            match send_nosignal(&self.stream, data) {
                Ok(written) => {
                    self.fwd_cnt += Wrapping(u32::try_from(written).unwrap_or(0));
                    rest = data.get(written..).unwrap_or_default();
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return self.reset(ConnectionError::HostIo(e)),
            }
        }
        self.to_host.extend(rest);
        self.maybe_credit_update();
    }

    /// Writes what is pending for the host until it would block.
    fn flush_to_host(&mut self) {
        while !self.reply.is_empty() {
            match send_nosignal(&self.stream, &self.reply) {
                Ok(0) => return,
                Ok(written) => {
                    self.reply.drain(..written.min(self.reply.len()));
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return,
                Err(e) => return self.reset(ConnectionError::HostIo(e)),
            }
        }
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match send_nosignal(&self.stream, front) {
                Ok(0) => break,
                Ok(written) => {
                    let written = written.min(self.to_host.len());
                    self.to_host.drain(..written);
                    self.fwd_cnt += Wrapping(u32::try_from(written).unwrap_or(0));
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => break,
                Err(e) => return self.reset(ConnectionError::HostIo(e)),
            }
        }
        if !self.has_output() && self.guest_shut_send && !self.host_write_shut {
            // The host reads EOF: the guest half-closed. Fails only if the host is gone.
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_shut = true;
        }
        self.maybe_credit_update();
        self.check_finished();
    }

    /// Queues a CREDIT_UPDATE if the guest would otherwise stall on credit it has
    /// already been given back.
    fn maybe_credit_update(&mut self) {
        if self.guest_shut_send || self.is_closed() {
            return;
        }
        let untold = (self.fwd_cnt - self.fwd_cnt_told).0;
        if untold == 0 {
            return;
        }
        let guest_view_free = CONN_BUF_SIZE.saturating_sub((self.rx_cnt - self.fwd_cnt_told).0);
        if guest_view_free < CREDIT_UPDATE_THRESHOLD && (untold >= CREDIT_UPDATE_MIN_STEP || self.to_host.is_empty()) {
            self.pending.credit_update = true;
        }
    }

    fn guest_shutdown(&mut self, flags: u32, now: Instant) {
        if flags & SHUTDOWN_RCV != 0 && !self.guest_shut_recv {
            self.guest_shut_recv = true;
            self.readable = false;
            // Host writes now fail instead of filling a buffer nobody reads.
            let _ = self.stream.shutdown(Shutdown::Read);
        }
        if flags & SHUTDOWN_SEND != 0 && !self.guest_shut_send {
            self.guest_shut_send = true;
            self.pending.credit_update = false;
            if !self.has_output() && !self.host_write_shut {
                let _ = self.stream.shutdown(Shutdown::Write);
                self.host_write_shut = true;
            }
        }
        if self.guest_shut_recv && self.guest_shut_send && self.state == ConnState::Established {
            // The guest closed its socket and waits for our RST; first the host gets
            // what is still buffered for it, within the close timeout.
            self.state = ConnState::Closing;
            self.deadline = Some(now + self.close_timeout);
        }
        self.check_finished();
    }

    /// The host stream has events (`IN`, `OUT`, `HUP`, `ERR`).
    pub fn on_stream_event(&mut self, events: EventSet) {
        if self.is_closed() {
            return;
        }
        let failed = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if (events.contains(EventSet::IN) || failed) && self.can_read_host() {
            // Read when the guest has a buffer for it: `next_packet`.
            self.readable = true;
        }
        if (events.contains(EventSet::OUT) || failed) && self.has_output() {
            self.flush_to_host();
        }
    }

    /// The next packet for the guest, its payload (at most `max_data` bytes) read from
    /// the host stream into `buf`. Returns the header and the payload length.
    pub fn next_packet(&mut self, max_data: usize, buf: &mut [u8], now: Instant) -> Option<(PacketHeader, usize)> {
        match self.state {
            ConnState::Closed { .. } => return None,
            ConnState::LocalInit => {
                return std::mem::take(&mut self.pending.request).then(|| (self.outgoing(OP_REQUEST), 0));
            }
            ConnState::Established | ConnState::Closing => {}
        }
        if std::mem::take(&mut self.pending.response) {
            return Some((self.outgoing(OP_RESPONSE), 0));
        }
        if self.data_for_guest() {
            let want = max_data.min(buf.len()).min(self.peer_credit() as usize);
            if let Some(chunk) = buf.get_mut(..want).filter(|chunk| !chunk.is_empty()) {
                match (&self.stream).read(chunk) {
                    Ok(0) => self.on_host_eof(),
                    Ok(read) => {
                        let read = read.min(want);
                        // `read` <= 64 KiB.
                        let len = u32::try_from(read).unwrap_or(0);
                        self.tx_cnt += Wrapping(len);
                        if read < want {
                            // Probably drained; epoll says when there is more.
                            self.readable = false;
                        }
                        let mut hdr = self.outgoing(OP_RW);
                        hdr.len = len;
                        return Some((hdr, read));
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                        self.readable = false;
                    }
                    Err(e) => {
                        self.reset(ConnectionError::HostIo(e));
                        return None;
                    }
                }
            }
        }
        if self.is_closed() {
            return None;
        }
        if self.pending.credit_update {
            return Some((self.outgoing(OP_CREDIT_UPDATE), 0));
        }
        let flags = std::mem::take(&mut self.pending.shutdown_flags);
        if flags != 0 {
            let mut hdr = self.outgoing(OP_SHUTDOWN);
            hdr.flags = flags;
            if flags & SHUTDOWN_RCV != 0 && self.state == ConnState::Established {
                // The host is gone: the guest should answer with RST.
                self.state = ConnState::Closing;
                self.deadline = Some(now + self.close_timeout);
            }
            return Some((hdr, 0));
        }
        None
    }

    /// The host stream reached EOF: the host will send nothing more. Tell the guest, and
    /// whether the host can still receive (half-close) or is gone.
    fn on_host_eof(&mut self) {
        self.readable = false;
        self.host_eof = true;
        let mut flags = SHUTDOWN_SEND;
        if peer_hung_up(&self.stream) {
            flags |= SHUTDOWN_RCV;
        }
        self.pending.shutdown_flags |= flags;
        self.check_finished();
    }

    /// Applies the deadline, if it passed.
    pub fn on_timeout(&mut self, now: Instant) {
        match self.deadline {
            Some(deadline) if deadline <= now => {}
            _ => return,
        }
        match self.state {
            ConnState::LocalInit => self.reset(ConnectionError::ConnectTimeout),
            ConnState::Closing => self.reset(ConnectionError::CloseTimeout),
            ConnState::Established | ConnState::Closed { .. } => self.deadline = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const CID: u64 = 3;
    const LOCAL: u32 = 1 << 30;
    const PEER: u32 = 1024;

    fn guest(op: u16) -> PacketHeader {
        PacketHeader {
            src_cid: CID,
            dst_cid: VSOCK_HOST_CID,
            src_port: PEER,
            dst_port: LOCAL,
            type_: TYPE_STREAM,
            op,
            buf_alloc: 1000,
            ..PacketHeader::default()
        }
    }

    fn credit(buf_alloc: u32, fwd_cnt: u32) -> PacketHeader {
        PacketHeader { buf_alloc, fwd_cnt, ..guest(OP_CREDIT_UPDATE) }
    }

    /// A connection and the host end of its stream.
    fn local_conn() -> (HostConnection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let conn = HostConnection::new_local(ours, CID, LOCAL, PEER, &Timeouts::default(), Instant::now());
        (conn, host)
    }

    fn established() -> (HostConnection, UnixStream) {
        let (mut conn, mut host) = local_conn();
        conn.next_packet(0, &mut [], Instant::now()).unwrap();
        conn.on_guest_packet(&guest(OP_RESPONSE), &[], Instant::now());
        let mut ok = [0u8; 14];
        host.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"OK 1073741824\n");
        (conn, host)
    }

    fn next(conn: &mut HostConnection) -> Option<(PacketHeader, Vec<u8>)> {
        let mut buf = vec![0u8; 64 * 1024];
        conn.next_packet(buf.len(), &mut buf, Instant::now())
            .map(|(hdr, len)| (hdr, buf[..len].to_vec()))
    }

    fn read_host(host: &mut UnixStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match host.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        out
    }

    #[test]
    fn host_initiated_handshake() {
        let (mut conn, mut host) = local_conn();
        assert_eq!(conn.state(), ConnState::LocalInit);
        assert!(conn.has_pending_rx());
        assert!(conn.wanted_events().is_empty());
        let (req, data) = next(&mut conn).unwrap();
        assert!(data.is_empty());
        assert_eq!(
            (req.op, req.src_cid, req.dst_cid, req.src_port, req.dst_port, req.type_),
            (OP_REQUEST, VSOCK_HOST_CID, CID, LOCAL, PEER, TYPE_STREAM)
        );
        assert_eq!((req.buf_alloc, req.fwd_cnt), (CONN_BUF_SIZE, 0));
        assert!(!conn.has_pending_rx());
        assert!(next(&mut conn).is_none());

        conn.on_guest_packet(&guest(OP_RESPONSE), &[], Instant::now());
        assert_eq!(conn.state(), ConnState::Established);
        assert_eq!(conn.deadline(), None);
        assert_eq!(read_host(&mut host), b"OK 1073741824\n");
        assert_eq!(conn.wanted_events(), EventSet::IN);
    }

    #[test]
    fn refused_unexpected_and_timed_out_requests() {
        let (mut conn, _host) = local_conn();
        next(&mut conn).unwrap();
        conn.on_guest_packet(&guest(OP_RST), &[], Instant::now());
        assert_eq!(conn.state(), ConnState::Closed { reset_guest: false });

        let (mut conn, _host) = local_conn();
        conn.on_guest_packet(&guest(OP_RW), b"early", Instant::now());
        assert_eq!(conn.state(), ConnState::Closed { reset_guest: true });
        assert!(conn.take_reset_reason().unwrap().is_guest_fault());

        let (mut conn, _host) = local_conn();
        let deadline = conn.deadline().unwrap();
        conn.on_timeout(deadline - Duration::from_millis(1));
        assert_eq!(conn.state(), ConnState::LocalInit);
        conn.on_timeout(deadline);
        assert_eq!(conn.state(), ConnState::Closed { reset_guest: true });
        assert!(matches!(conn.take_reset_reason(), Some(ConnectionError::ConnectTimeout)));
    }

    #[test]
    fn guest_initiated_connection_answers_response_first() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut request = guest(OP_REQUEST);
        request.buf_alloc = 4096;
        let mut conn = HostConnection::new_peer(ours, &request, &Timeouts::default());
        host.write_all(b"early bytes").unwrap();
        conn.on_stream_event(EventSet::IN);
        let (resp, _) = next(&mut conn).unwrap();
        assert_eq!((resp.op, resp.src_port, resp.dst_port, resp.dst_cid), (OP_RESPONSE, LOCAL, PEER, CID));
        let (rw, data) = next(&mut conn).unwrap();
        assert_eq!((rw.op, rw.len), (OP_RW, 11));
        assert_eq!(data, b"early bytes");
    }

    #[test]
    fn host_data_respects_guest_credit_and_resumes_on_update() {
        let (mut conn, mut host) = established();
        // The guest advertised 1000 bytes.
        host.write_all(&[7u8; 3000]).unwrap();
        conn.on_stream_event(EventSet::IN);
        assert!(conn.wanted_events().is_empty(), "readable: wait for an RX buffer, not epoll");
        let (hdr, data) = next(&mut conn).unwrap();
        assert_eq!((hdr.op, hdr.len, data.len()), (OP_RW, 1000, 1000));
        assert!(!conn.has_pending_rx());
        assert!(next(&mut conn).is_none());
        assert!(conn.wanted_events().is_empty(), "no credit: do not watch the stream");

        // The guest consumed 400 bytes.
        conn.on_guest_packet(&credit(1000, 400), &[], Instant::now());
        assert!(conn.has_pending_rx());
        let (hdr, _) = next(&mut conn).unwrap();
        assert_eq!(hdr.len, 400);
        // It grew its buffer.
        conn.on_guest_packet(&credit(10_000, 1400), &[], Instant::now());
        let (hdr, _) = next(&mut conn).unwrap();
        assert_eq!(hdr.len, 1600);
        // Drained: back to watching the stream.
        assert!(next(&mut conn).is_none());
        assert_eq!(conn.wanted_events(), EventSet::IN);
        // A shrinking or lying guest never gets negative credit.
        conn.on_guest_packet(&credit(10, 0), &[], Instant::now());
        assert!(conn.wanted_events().is_empty());
    }

    #[test]
    fn guest_data_is_buffered_while_the_host_is_slow() {
        let (mut conn, mut host) = established();
        let chunk = vec![0x5a; 64 * 1024];
        let mut sent = 0;
        // Fill the socket buffer, then some of ours.
        while !conn.wanted_events().contains(EventSet::OUT) {
            conn.on_guest_packet(&guest(OP_RW), &chunk, Instant::now());
            sent += chunk.len();
            assert!(sent < 16 << 20, "socket never filled");
        }
        assert_eq!(conn.state(), ConnState::Established);
        let mut got = read_host(&mut host);
        conn.on_stream_event(EventSet::OUT);
        got.extend(read_host(&mut host));
        conn.on_stream_event(EventSet::OUT);
        got.extend(read_host(&mut host));
        assert_eq!(got.len(), sent);
        assert!(got.iter().all(|&b| b == 0x5a));
        assert!(!conn.wanted_events().contains(EventSet::OUT));
        let (hdr, _) = next(&mut conn).unwrap();
        assert_eq!((hdr.op, hdr.fwd_cnt as usize), (OP_CREDIT_UPDATE, sent));
    }

    #[test]
    fn guest_overrunning_its_credit_is_reset() {
        let (mut conn, _host) = established();
        let chunk = vec![1u8; 64 * 1024];
        // The host never reads; at most CONN_BUF_SIZE may be held beyond the socket.
        for _ in 0..200 {
            conn.on_guest_packet(&guest(OP_RW), &chunk, Instant::now());
            if conn.state() != ConnState::Established {
                break;
            }
        }
        assert_eq!(conn.state(), ConnState::Closed { reset_guest: true });
        assert!(matches!(conn.take_reset_reason(), Some(ConnectionError::CreditExceeded { .. })));
    }

    #[test]
    fn credit_request_is_answered() {
        let (mut conn, _host) = established();
        conn.on_guest_packet(&guest(OP_RW), b"abc", Instant::now());
        conn.on_guest_packet(&guest(OP_CREDIT_REQUEST), &[], Instant::now());
        let (hdr, _) = next(&mut conn).unwrap();
        assert_eq!((hdr.op, hdr.buf_alloc, hdr.fwd_cnt), (OP_CREDIT_UPDATE, CONN_BUF_SIZE, 3));
        assert!(next(&mut conn).is_none());
    }

    #[test]
    fn host_half_close_then_guest_close() {
        let (mut conn, mut host) = established();
        host.write_all(b"bye").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        conn.on_stream_event(EventSet::IN);
        let (hdr, data) = next(&mut conn).unwrap();
        assert_eq!((hdr.op, data.as_slice()), (OP_RW, &b"bye"[..]));
        conn.on_stream_event(EventSet::IN);
        let (hdr, _) = next(&mut conn).unwrap();
        assert_eq!((hdr.op, hdr.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        assert_eq!(conn.state(), ConnState::Established);
        // The guest still talks to the half-closed host.
        conn.on_guest_packet(&guest(OP_RW), b"reply", Instant::now());
        assert_eq!(read_host(&mut host), b"reply");
        // Then it closes its socket: nothing can flow any more.
        let mut shut = guest(OP_SHUTDOWN);
        shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        conn.on_guest_packet(&shut, &[], Instant::now());
        assert_eq!(conn.state(), ConnState::Closed { reset_guest: true });
    }

    #[test]
    fn host_close_waits_for_the_guest_rst_then_times_out() {
        let (mut conn, host) = established();
        drop(host);
        conn.on_stream_event(EventSet::IN | EventSet::HANG_UP);
        let (hdr, _) = next(&mut conn).unwrap();
        assert_eq!((hdr.op, hdr.flags), (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
        assert_eq!(conn.state(), ConnState::Closing);
        let deadline = conn.deadline().unwrap();
        conn.on_timeout(deadline);
        assert_eq!(conn.state(), ConnState::Closed { reset_guest: true });

        let (mut conn, host) = established();
        drop(host);
        conn.on_stream_event(EventSet::HANG_UP);
        next(&mut conn).unwrap();
        conn.on_guest_packet(&guest(OP_RST), &[], Instant::now());
        assert_eq!(conn.state(), ConnState::Closed { reset_guest: false });
    }

    #[test]
    fn guest_half_close_reaches_the_host_as_eof() {
        let (mut conn, mut host) = established();
        conn.on_guest_packet(&guest(OP_RW), b"last words", Instant::now());
        let mut shut = guest(OP_SHUTDOWN);
        shut.flags = SHUTDOWN_SEND;
        conn.on_guest_packet(&shut, &[], Instant::now());
        host.set_nonblocking(false).unwrap();
        let mut got = Vec::new();
        host.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"last words");
        assert_eq!(conn.state(), ConnState::Established);
        // Data after the guest's SHUTDOWN(SEND) is a protocol error.
        conn.on_guest_packet(&guest(OP_RW), b"more", Instant::now());
        assert!(matches!(conn.take_reset_reason(), Some(ConnectionError::DataAfterShutdown)));
    }

    #[test]
    fn guest_close_flushes_buffered_data_before_rst() {
        let (mut conn, mut host) = established();
        let chunk = vec![3u8; 64 * 1024];
        let mut sent = 0;
        while !conn.wanted_events().contains(EventSet::OUT) {
            conn.on_guest_packet(&guest(OP_RW), &chunk, Instant::now());
            sent += chunk.len();
        }
        let mut shut = guest(OP_SHUTDOWN);
        shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
        conn.on_guest_packet(&shut, &[], Instant::now());
        assert_eq!(conn.state(), ConnState::Closing);
        assert!(conn.deadline().is_some());
        let mut got = 0;
        while conn.state() == ConnState::Closing {
            got += read_host(&mut host).len();
            conn.on_stream_event(EventSet::OUT);
        }
        got += read_host(&mut host).len();
        assert_eq!(got, sent);
        assert_eq!(conn.state(), ConnState::Closed { reset_guest: true });
    }

    #[test]
    fn unexpected_ops_reset_an_established_connection() {
        for op in [OP_REQUEST, OP_RESPONSE, 0, 8, 0xffff] {
            let (mut conn, _host) = established();
            conn.on_guest_packet(&guest(op), &[], Instant::now());
            assert_eq!(conn.state(), ConnState::Closed { reset_guest: true }, "op {op}");
        }
    }

    #[test]
    fn host_write_failure_resets() {
        let (mut conn, host) = established();
        drop(host);
        conn.on_guest_packet(&guest(OP_RW), b"into the void", Instant::now());
        assert_eq!(conn.state(), ConnState::Closed { reset_guest: true });
        assert!(matches!(conn.take_reset_reason(), Some(ConnectionError::HostIo(_))));
    }
}
