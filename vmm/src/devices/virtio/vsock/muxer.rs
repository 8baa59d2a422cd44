//! Routes packets between the guest and the host side: keeps the connection table
//! (keyed by local host port and guest port), accepts host clients and runs their
//! `CONNECT` handshake, dials `<uds_path>_<port>` for guest connects, allocates local
//! ports, and decides which connection fills the next guest RX buffer (control packets
//! first, then connections round-robin).
//!
//! Trusts nothing a packet says: wrong CIDs, types, ops and packets for unknown
//! connections are answered with RST or dropped. The number of connections, pending
//! handshakes and queued RSTs is bounded. File descriptors are registered with the event
//! loop through `FdRegistry` in `sync_fds`, and a stream is only closed after it left the
//! epoll set (so a reused fd number never meets a stale registration).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, ErrorKind};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::connection::{ConnState, HostConnection};
use super::packet::{PacketHeader, OP_REQUEST, OP_RST, TYPE_STREAM};
use super::unix::{connect_nonblocking, peer_hung_up, ConnectLine, HandshakeProgress, HostListener, UnixBackendError};
use super::{Timeouts, VSOCK_HOST_CID};
use crate::devices::virtio::GuestWarnings;

/// Live connections plus pending handshakes, at most.
pub const MAX_CONNECTIONS: usize = 1024;
/// RSTs waiting for guest RX buffers, at most; beyond, they are dropped (the guest gets
/// another when it next uses the connection).
const MAX_QUEUED_RSTS: usize = 4096;
/// Local ports of host-initiated connections: from here to `LAST_LOCAL_PORT`, wrapping.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// `u32::MAX` is `VMADDR_PORT_ANY`.
const LAST_LOCAL_PORT: u32 = u32::MAX - 1;
/// Connections accepted per listener wakeup (the rest on the next one).
const ACCEPT_BATCH: usize = 32;
/// After `accept` failed for lack of resources, retry after this long at the latest.
const ACCEPT_RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    #[error(transparent)]
    Backend(#[from] UnixBackendError),
}

/// Watches file descriptors for the muxer; the event loop's `EventOps` in the VMM.
pub trait FdRegistry {
    fn add(&mut self, fd: RawFd, events: EventSet) -> io::Result<()>;
    fn modify(&mut self, fd: RawFd, events: EventSet) -> io::Result<()>;
    fn remove(&mut self, fd: RawFd) -> io::Result<()>;
}

/// A connection is named by its two ports; the CIDs are fixed (host and this guest).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

/// A host client that has not finished its `CONNECT` line.
struct PendingHandshake {
    stream: UnixStream,
    line: ConnectLine,
    deadline: Instant,
    registered: bool,
}

/// A stream to close once it is out of the epoll set.
struct Grave {
    stream: UnixStream,
    registered: bool,
}

pub struct VsockMuxer {
    guest_cid: u64,
    listener: HostListener,
    timeouts: Timeouts,
    connections: HashMap<ConnKey, HostConnection>,
    conn_by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, PendingHandshake>,
    /// Connections with something for the guest, in service order.
    rx_ready: VecDeque<ConnKey>,
    rx_ready_set: HashSet<ConnKey>,
    /// RSTs for the guest that belong to no (live) connection.
    rx_resets: VecDeque<PacketHeader>,
    /// Connections whose epoll interest may have changed.
    dirty: HashSet<ConnKey>,
    graves: Vec<Grave>,
    next_local_port: u32,
    /// The device is active: host clients are accepted.
    accepting: bool,
    listener_registered: bool,
    /// `accept` failed for lack of resources: stop watching the listener until this
    /// time or until a connection closes, instead of spinning on it.
    accept_paused_until: Option<Instant>,
    warnings: GuestWarnings,
}

impl VsockMuxer {
    /// Listens on `uds_path` for host clients of the guest `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path, timeouts: Timeouts) -> Result<Self, MuxerError> {
        Ok(Self {
            guest_cid,
            listener: HostListener::bind(uds_path)?,
            timeouts,
            connections: HashMap::new(),
            conn_by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            rx_ready: VecDeque::new(),
            rx_ready_set: HashSet::new(),
            rx_resets: VecDeque::new(),
            dirty: HashSet::new(),
            graves: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
            accepting: false,
            listener_registered: false,
            accept_paused_until: None,
            warnings: GuestWarnings::new(),
        })
    }

    pub fn uds_path(&self) -> &Path {
        self.listener.path()
    }

    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Starts (device active) or stops accepting host clients.
    pub fn set_accepting(&mut self, accepting: bool) {
        self.accepting = accepting;
    }

    #[cfg(test)]
    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Why the muxer's state cannot go into a snapshot now, if it cannot: a snapshot
    /// carries no connections (their host sockets do not survive the VMM), so it is
    /// taken once every connection and half-made host connection is gone and nothing
    /// waits for the guest.
    pub fn snapshot_blocker(&self) -> Option<String> {
        let (connections, handshakes) = (self.connections.len(), self.handshakes.len());
        if connections + handshakes > 0 {
            return Some(format!(
                "{connections} vsock connections and {handshakes} host clients still connecting (close them first)"
            ));
        }
        if self.has_pending_rx() {
            return Some("vsock packets still wait for the guest".into());
        }
        None
    }

    fn live_count(&self) -> usize {
        self.connections.len() + self.handshakes.len()
    }

    fn queue_reset(&mut self, rst: PacketHeader) {
        if self.rx_resets.len() < MAX_QUEUED_RSTS {
            self.rx_resets.push_back(rst);
        } else {
            log::debug!("vsock: RST queue full, dropping RST for port {}", rst.dst_port);
        }
    }

    fn bury(&mut self, stream: UnixStream, registered: bool) {
        self.graves.push(Grave { stream, registered });
        // A descriptor is about to be freed: accepting may work again.
        self.accept_paused_until = None;
    }

    /// Re-files `key` after anything happened to it: drops it if closed (RST to the
    /// guest if due), queues it for the guest if it has something to send.
    fn touch(&mut self, key: ConnKey) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if let ConnState::Closed { reset_guest } = conn.state() {
            if let Some(reason) = conn.take_reset_reason() {
                let msg = format!(
                    "vsock: resetting connection host port {} <-> guest port {}: {reason}",
                    key.local_port, key.peer_port
                );
                if reason.is_guest_fault() {
                    self.warnings.warn(format_args!("{msg}"));
                } else {
                    log::debug!("{msg}");
                }
            }
            if let Some(conn) = self.connections.remove(&key) {
                self.conn_by_fd.remove(&conn.as_raw_fd());
                if reset_guest {
                    self.queue_reset(conn.header(OP_RST));
                }
                let registered = conn.registered.is_some();
                self.bury(conn.into_stream(), registered);
            }
            return;
        }
        if conn.has_pending_rx() && self.rx_ready_set.insert(key) {
            self.rx_ready.push_back(key);
        }
        self.dirty.insert(key);
    }

    fn insert_connection(&mut self, conn: HostConnection) {
        let key = ConnKey { local_port: conn.local_port(), peer_port: conn.peer_port() };
        self.conn_by_fd.insert(conn.as_raw_fd(), key);
        self.connections.insert(key, conn);
        self.touch(key);
    }

    /// A packet from the guest's TX queue.
    pub fn on_guest_packet(&mut self, hdr: &PacketHeader, data: &[u8], now: Instant) {
        if hdr.src_cid != self.guest_cid {
            self.warnings.warn(format_args!(
                "vsock: dropping packet from CID {} (the guest's CID is {})",
                hdr.src_cid, self.guest_cid
            ));
            return;
        }
        if hdr.dst_cid != VSOCK_HOST_CID || hdr.type_ != TYPE_STREAM {
            // Other VMs are unreachable and only stream sockets exist: refuse.
            log::debug!("vsock: refusing packet to CID {} type {}", hdr.dst_cid, hdr.type_);
            if hdr.op != OP_RST {
                self.queue_reset(hdr.reset_reply());
            }
            return;
        }
        let key = ConnKey { local_port: hdr.dst_port, peer_port: hdr.src_port };
        if let Some(conn) = self.connections.get_mut(&key) {
            conn.on_guest_packet(hdr, data, now);
            self.touch(key);
            return;
        }
        match hdr.op {
            OP_REQUEST => self.guest_connect(hdr),
            OP_RST => {}
            _ => self.queue_reset(hdr.reset_reply()),
        }
    }

    /// Where a guest connect to host `port` goes: `<uds_path>_<port>`.
    fn backend_path(&self, port: u32) -> PathBuf {
        let mut path = OsString::from(self.listener.path().as_os_str());
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }

    fn guest_connect(&mut self, request: &PacketHeader) {
        if self.live_count() >= MAX_CONNECTIONS {
            self.warnings.warn(format_args!(
                "vsock: {MAX_CONNECTIONS} connections open, refusing guest connect to host port {}",
                request.dst_port
            ));
            return self.queue_reset(request.reset_reply());
        }
        let path = self.backend_path(request.dst_port);
        match connect_nonblocking(&path) {
            Ok(stream) => self.insert_connection(HostConnection::new_peer(stream, request, &self.timeouts)),
            Err(e) => {
                log::debug!("vsock: guest connect to {} refused: {e}", path.display());
                self.queue_reset(request.reset_reply());
            }
        }
    }

    /// True if `next_rx_packet` may have something (it can still come back empty when
    /// a stream turned out to have nothing).
    pub fn has_pending_rx(&self) -> bool {
        !self.rx_resets.is_empty() || !self.rx_ready.is_empty()
    }

    /// The next packet for the guest, with at most `max_data` payload bytes in `buf`.
    pub fn next_rx_packet(&mut self, max_data: usize, buf: &mut [u8], now: Instant) -> Option<(PacketHeader, usize)> {
        if let Some(rst) = self.rx_resets.pop_front() {
            return Some((rst, 0));
        }
        // Each connection gets one turn: one that cannot use this buffer (say, data but
        // a header-only buffer) goes back to the end of the line, not round again.
        for _ in 0..self.rx_ready.len() {
            let Some(key) = self.rx_ready.pop_front() else {
                break;
            };
            self.rx_ready_set.remove(&key);
            let Some(conn) = self.connections.get_mut(&key) else {
                continue;
            };
            let packet = conn.next_packet(max_data, buf, now);
            self.touch(key);
            if packet.is_some() {
                return packet;
            }
            if let Some(rst) = self.rx_resets.pop_front() {
                return Some((rst, 0));
            }
        }
        None
    }

    /// The listener is readable: take the new host clients.
    pub fn accept_host_connections(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok(stream) => {
                    if self.live_count() >= MAX_CONNECTIONS {
                        log::warn!("vsock: {MAX_CONNECTIONS} connections open, refusing a host client");
                        continue;
                    }
                    self.handshakes.insert(
                        stream.as_raw_fd(),
                        PendingHandshake {
                            stream,
                            line: ConnectLine::new(),
                            deadline: now + self.timeouts.handshake,
                            registered: false,
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::ConnectionAborted) => {}
                Err(e) => {
                    log::warn!("vsock: accepting on {} failed: {e}; retrying later", self.uds_path().display());
                    self.accept_paused_until = Some(now + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    /// Events on a host stream (a handshake or a connection).
    pub fn on_fd_event(&mut self, fd: RawFd, events: EventSet, now: Instant) {
        if self.handshakes.contains_key(&fd) {
            return self.continue_handshake(fd, now);
        }
        match self.conn_by_fd.get(&fd).copied() {
            Some(key) => {
                if let Some(conn) = self.connections.get_mut(&key) {
                    conn.on_stream_event(events);
                }
                self.touch(key);
            }
            None => log::debug!("vsock: event on fd {fd}, which belongs to no connection"),
        }
    }

    fn continue_handshake(&mut self, fd: RawFd, now: Instant) {
        let Some(pending) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let progress = pending.line.read_from(&mut pending.stream);
        if let Ok(HandshakeProgress::Pending) = progress {
            return;
        }
        let Some(pending) = self.handshakes.remove(&fd) else {
            return;
        };
        match progress {
            Ok(HandshakeProgress::Connect(peer_port)) => self.start_host_connection(pending, peer_port, now),
            Ok(HandshakeProgress::Pending) => {}
            Err(e) => {
                log::debug!("vsock: closing host client: {e}");
                self.bury(pending.stream, pending.registered);
            }
        }
    }

    fn allocate_local_port(&mut self) -> Option<u32> {
        let in_use: HashSet<u32> = self.connections.keys().map(|key| key.local_port).collect();
        for _ in 0..=in_use.len() {
            let port = self.next_local_port;
            self.next_local_port = if port >= LAST_LOCAL_PORT { FIRST_LOCAL_PORT } else { port + 1 };
            if !in_use.contains(&port) {
                return Some(port);
            }
        }
        None
    }

    fn start_host_connection(&mut self, pending: PendingHandshake, peer_port: u32, now: Instant) {
        if peer_hung_up(&pending.stream) {
            // The client gave up already (say, a dial attempt that timed out while the
            // guest was booting): do not bother the guest.
            log::debug!("vsock: host client for guest port {peer_port} left before its connection started");
            return self.bury(pending.stream, pending.registered);
        }
        let Some(local_port) = self.allocate_local_port() else {
            log::warn!("vsock: no free local port for a host connection to guest port {peer_port}");
            return self.bury(pending.stream, pending.registered);
        };
        let mut conn =
            HostConnection::new_local(pending.stream, self.guest_cid, local_port, peer_port, &self.timeouts, now);
        conn.registered = pending.registered.then_some(EventSet::IN);
        self.insert_connection(conn);
    }

    /// Applies the deadlines that passed.
    pub fn on_timer(&mut self, now: Instant) {
        let expired: Vec<RawFd> =
            self.handshakes.iter().filter(|(_, hs)| hs.deadline <= now).map(|(&fd, _)| fd).collect();
        for fd in expired {
            if let Some(pending) = self.handshakes.remove(&fd) {
                log::debug!("vsock: host client sent no CONNECT line in {:?}, closing", self.timeouts.handshake);
                self.bury(pending.stream, pending.registered);
            }
        }
        let due: Vec<ConnKey> = self
            .connections
            .iter()
            .filter(|(_, conn)| conn.deadline().is_some_and(|deadline| deadline <= now))
            .map(|(&key, _)| key)
            .collect();
        for key in due {
            if let Some(conn) = self.connections.get_mut(&key) {
                conn.on_timeout(now);
            }
            self.touch(key);
        }
        if self.accept_paused_until.is_some_and(|until| until <= now) {
            self.accept_paused_until = None;
        }
    }

    /// The earliest deadline, for the device's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        let handshakes = self.handshakes.values().map(|hs| hs.deadline);
        let connections = self.connections.values().filter_map(HostConnection::deadline);
        handshakes.chain(connections).chain(self.accept_paused_until).min()
    }

    /// Drops every connection and handshake (device reset): the guest forgot them.
    pub fn close_all(&mut self) {
        let connections: Vec<HostConnection> = self.connections.drain().map(|(_, conn)| conn).collect();
        for conn in connections {
            let registered = conn.registered.is_some();
            self.bury(conn.into_stream(), registered);
        }
        let handshakes: Vec<PendingHandshake> = self.handshakes.drain().map(|(_, hs)| hs).collect();
        for pending in handshakes {
            self.bury(pending.stream, pending.registered);
        }
        self.conn_by_fd.clear();
        self.rx_ready.clear();
        self.rx_ready_set.clear();
        self.rx_resets.clear();
        self.dirty.clear();
        self.accepting = false;
    }

    /// Brings the event loop's view in line: closes buried streams after removing them,
    /// watches the listener while accepting, and each stream for what it waits for.
    pub fn sync_fds(&mut self, registry: &mut dyn FdRegistry) {
        // Registration failures reset connections, which buries them: a second round.
        for _ in 0..2 {
            for grave in std::mem::take(&mut self.graves) {
                if grave.registered {
                    if let Err(e) = registry.remove(grave.stream.as_raw_fd()) {
                        log::warn!("vsock: cannot stop watching a closed host stream: {e}");
                    }
                }
            }
            self.sync_listener(registry);
            self.sync_handshakes(registry);
            self.sync_connections(registry);
            if self.graves.is_empty() {
                break;
            }
        }
    }

    fn sync_listener(&mut self, registry: &mut dyn FdRegistry) {
        let want = self.accepting && self.accept_paused_until.is_none();
        if want == self.listener_registered {
            return;
        }
        let fd = self.listener.as_raw_fd();
        let result = if want { registry.add(fd, EventSet::IN) } else { registry.remove(fd) };
        match result {
            Ok(()) => self.listener_registered = want,
            Err(e) => log::warn!("vsock: cannot update the watch on {}: {e}", self.uds_path().display()),
        }
    }

    fn sync_handshakes(&mut self, registry: &mut dyn FdRegistry) {
        let mut failed = Vec::new();
        for (&fd, pending) in self.handshakes.iter_mut().filter(|(_, hs)| !hs.registered) {
            match registry.add(fd, EventSet::IN) {
                Ok(()) => pending.registered = true,
                Err(e) => {
                    log::warn!("vsock: cannot watch a host client: {e}");
                    failed.push(fd);
                }
            }
        }
        for fd in failed {
            // Never registered: closing it right away is fine.
            self.handshakes.remove(&fd);
        }
    }

    fn sync_connections(&mut self, registry: &mut dyn FdRegistry) {
        let dirty: Vec<ConnKey> = self.dirty.drain().collect();
        for key in dirty {
            let Some(conn) = self.connections.get_mut(&key) else {
                continue;
            };
            let fd = conn.as_raw_fd();
            let want = conn.wanted_events();
            let result = match conn.registered {
                None if want.is_empty() => Ok(()),
                None => registry.add(fd, want),
                Some(_) if want.is_empty() => registry.remove(fd),
                Some(current) if current != want => registry.modify(fd, want),
                Some(_) => Ok(()),
            };
            match result {
                Ok(()) => conn.registered = (!want.is_empty()).then_some(want),
                Err(e) => {
                    log::warn!(
                        "vsock: cannot watch the host stream of host port {} <-> guest port {}: {e}",
                        key.local_port,
                        key.peer_port
                    );
                    conn.fail_host(e);
                    self.touch(key);
                }
            }
        }
    }
}
