//! Device-level tests: a guest driver (`test_utils::TestVm`) and host clients on real
//! Unix sockets talk through the device, its muxer and its event loop.

use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use super::connection::CONN_BUF_SIZE;
use super::packet::{
    PacketHeader, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN,
    SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::test_utils::{
    guest_hdr, pattern, read_available, Options, RxLayout, RxPacket, TestVm, TxLayout, GUEST_BUF_ALLOC, GUEST_CID,
    READ, WRITE,
};
use super::{Timeouts, VSOCK_HOST_CID};

const AGENT_PORT: u32 = 1024;
/// Guest memory no harness buffer uses.
const FREE_MEM: u64 = 0x180_0000;

fn only(packets: Vec<RxPacket>) -> RxPacket {
    assert_eq!(packets.len(), 1, "{packets:?}");
    packets.into_iter().next().unwrap()
}

fn payload(packets: Vec<RxPacket>) -> Vec<u8> {
    packets
        .into_iter()
        .flat_map(|p| {
            assert_eq!(p.hdr.op, OP_RW, "{:?}", p.hdr);
            p.data
        })
        .collect()
}

fn short(timeouts: Timeouts) -> Options {
    Options { timeouts, ..Options::default() }
}

/// A timeout short enough for tests, long enough that a loaded machine does not hit it
/// by accident; and a wait that surely outlasts it.
const SHORT: Duration = Duration::from_millis(300);
const PAST_SHORT: Duration = Duration::from_millis(700);

/// A host client connects to guest `port` and the guest accepts: the client's stream
/// and the connection's local (host) port.
fn establish(vm: &mut TestVm, port: u32) -> (UnixStream, u32) {
    let mut host = vm.host_connect(port);
    vm.pump();
    let req = only(vm.recv()).hdr;
    assert_eq!(req.op, OP_REQUEST);
    vm.send_now(&guest_hdr(OP_RESPONSE, port, req.src_port), &[]);
    let (ok, eof) = read_available(&mut host);
    assert!(!eof);
    assert_eq!(ok, format!("OK {}\n", req.src_port).into_bytes());
    (host, req.src_port)
}

#[test]
fn host_initiated_connect_then_data_both_ways() {
    let mut vm = TestVm::new();
    let mut host = vm.host_connect(AGENT_PORT);
    vm.pump();
    let req = only(vm.recv()).hdr;
    assert_eq!(
        (req.op, req.type_, req.src_cid, req.dst_cid, req.dst_port, req.len),
        (OP_REQUEST, TYPE_STREAM, VSOCK_HOST_CID, GUEST_CID, AGENT_PORT, 0)
    );
    assert!(req.src_port >= 1 << 30);
    assert_eq!((req.buf_alloc, req.fwd_cnt), (CONN_BUF_SIZE, 0));
    assert_eq!(read_available(&mut host), (vec![], false), "no OK before the guest accepts");
    let interrupts = vm.interrupt.count();
    assert!(interrupts > 0);

    let local = req.src_port;
    vm.send_now(&guest_hdr(OP_RESPONSE, AGENT_PORT, local), &[]);
    assert_eq!(read_available(&mut host).0, format!("OK {local}\n").into_bytes());

    host.write_all(b"ping").unwrap();
    vm.pump();
    let rw = only(vm.recv());
    assert_eq!(
        (rw.hdr.op, rw.hdr.src_port, rw.hdr.dst_port, rw.hdr.dst_cid, rw.data.as_slice()),
        (OP_RW, local, AGENT_PORT, GUEST_CID, &b"ping"[..])
    );
    vm.send_now(&guest_hdr(OP_RW, AGENT_PORT, local), b"pong");
    assert_eq!(read_available(&mut host).0, b"pong");
    assert!(vm.interrupt.count() > interrupts);
    assert_eq!(vm.spurious_events(), 0, "an idle connection must not wake the loop");
}

#[test]
fn host_clients_get_distinct_local_ports() {
    let mut vm = TestVm::new();
    let _clients: Vec<UnixStream> = (0..3).map(|_| vm.host_connect(AGENT_PORT)).collect();
    vm.pump();
    let mut ports: Vec<u32> = vm.recv().iter().map(|p| p.hdr.src_port).collect();
    assert_eq!(ports.len(), 3);
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3);
}

#[test]
fn guest_initiated_connect_reaches_uds_port_listener_or_gets_rst() {
    let mut vm = TestVm::new();
    let listener = UnixListener::bind(format!("{}_5000", vm.uds.display())).unwrap();
    vm.send_now(&guest_hdr(OP_REQUEST, 40000, 5000), &[]);
    let resp = only(vm.recv()).hdr;
    assert_eq!(
        (resp.op, resp.src_cid, resp.dst_cid, resp.src_port, resp.dst_port, resp.buf_alloc),
        (OP_RESPONSE, VSOCK_HOST_CID, GUEST_CID, 5000, 40000, CONN_BUF_SIZE)
    );
    let (mut accepted, _) = listener.accept().unwrap();
    accepted.set_nonblocking(true).unwrap();
    vm.send_now(&guest_hdr(OP_RW, 40000, 5000), b"hello host");
    assert_eq!(read_available(&mut accepted).0, b"hello host");
    accepted.write_all(b"hello guest").unwrap();
    vm.pump();
    let rw = only(vm.recv());
    assert_eq!((rw.hdr.src_port, rw.hdr.dst_port, rw.data.as_slice()), (5000, 40000, &b"hello guest"[..]));

    // Nobody listens on 5001.
    vm.send_now(&guest_hdr(OP_REQUEST, 40001, 5001), &[]);
    let rst = only(vm.recv()).hdr;
    assert_eq!(
        (rst.op, rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port),
        (OP_RST, VSOCK_HOST_CID, GUEST_CID, 5001, 40001)
    );
    assert_eq!(vm.connection_count(), 1);
}

#[test]
fn host_connect_to_a_port_nobody_listens_on_is_closed() {
    let mut vm = TestVm::new();
    let mut host = vm.host_connect(9999);
    vm.pump();
    let req = only(vm.recv()).hdr;
    vm.send_now(&guest_hdr(OP_RST, 9999, req.src_port), &[]);
    assert_eq!(read_available(&mut host), (vec![], true));
    assert_eq!(vm.connection_count(), 0);
    assert!(vm.recv().is_empty(), "an RST is not answered");
}

#[test]
fn host_connect_times_out_when_the_guest_never_answers() {
    let mut vm = TestVm::with(short(Timeouts { connect: SHORT, ..Timeouts::default() }));
    let mut host = vm.host_connect(AGENT_PORT);
    vm.pump();
    let req = only(vm.recv()).hdr;
    vm.pump_for(PAST_SHORT);
    assert_eq!(read_available(&mut host), (vec![], true));
    let rst = only(vm.recv()).hdr;
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, req.src_port, AGENT_PORT));
    assert_eq!(vm.connection_count(), 0);
}

#[test]
fn malformed_or_missing_connect_lines_close_the_client() {
    let mut vm = TestVm::with(short(Timeouts { handshake: SHORT, ..Timeouts::default() }));
    let bad: [&[u8]; 6] = [
        b"GARBAGE\n",
        b"CONNECT\n",
        b"CONNECT 99999999999\n",
        b"CONNECT 1024 extra\n",
        b"connect 1024\n",
        &[b'x'; 40],
    ];
    let mut clients: Vec<UnixStream> = bad
        .iter()
        .map(|line| {
            let mut client = UnixStream::connect(&vm.uds).unwrap();
            client.write_all(line).unwrap();
            client.set_nonblocking(true).unwrap();
            client
        })
        .collect();
    let mut silent = UnixStream::connect(&vm.uds).unwrap();
    silent.set_nonblocking(true).unwrap();
    vm.pump();
    for client in &mut clients {
        assert_eq!(read_available(client), (vec![], true));
    }
    assert_eq!(read_available(&mut silent), (vec![], false));
    vm.pump_for(PAST_SHORT);
    assert_eq!(read_available(&mut silent), (vec![], true), "handshake timeout");
    assert!(vm.recv().is_empty(), "nothing reached the guest");
    assert_eq!(vm.connection_count(), 0);
}

#[test]
fn clients_that_left_before_their_connection_started_are_not_forwarded() {
    let mut vm = TestVm::new();
    drop(vm.host_connect(AGENT_PORT));
    vm.pump();
    assert!(vm.recv().is_empty());
    assert_eq!(vm.connection_count(), 0);
}

#[test]
fn connect_line_in_pieces_with_payload_right_behind_it() {
    let mut vm = TestVm::new();
    let mut host = UnixStream::connect(&vm.uds).unwrap();
    host.write_all(b"CONN").unwrap();
    vm.pump();
    assert!(vm.recv().is_empty());
    host.write_all(b"ECT 1024\nearly bytes").unwrap();
    host.set_nonblocking(true).unwrap();
    vm.pump();
    let req = only(vm.recv()).hdr;
    assert_eq!(req.dst_port, AGENT_PORT);
    vm.send_now(&guest_hdr(OP_RESPONSE, AGENT_PORT, req.src_port), &[]);
    assert_eq!(read_available(&mut host).0, format!("OK {}\n", req.src_port).into_bytes());
    assert_eq!(payload(vm.recv()), b"early bytes");
}

#[test]
fn host_to_guest_never_exceeds_guest_credit_and_resumes_on_update() {
    let mut vm = TestVm::new();
    let mut host = vm.host_connect(AGENT_PORT);
    vm.pump();
    let local = only(vm.recv()).hdr.src_port;
    let mut resp = guest_hdr(OP_RESPONSE, AGENT_PORT, local);
    resp.buf_alloc = 10_000;
    vm.send_now(&resp, &[]);
    read_available(&mut host);

    // Small enough for any socket buffer: all of it is there before the device looks.
    let data = pattern(30_000, 1);
    host.write_all(&data).unwrap();
    vm.pump();
    let mut got = payload(vm.recv());
    assert_eq!(got.len(), 10_000);
    vm.pump();
    assert!(vm.recv().is_empty());
    assert_eq!(vm.spurious_events(), 0, "no credit: the stream must not be polled");

    // The guest application read 4000 bytes.
    let mut update = guest_hdr(OP_CREDIT_UPDATE, AGENT_PORT, local);
    update.buf_alloc = 10_000;
    update.fwd_cnt = 4000;
    vm.send_now(&update, &[]);
    let more = payload(vm.recv());
    assert_eq!(more.len(), 4000);
    got.extend(more);

    // ... then everything, and it grew its buffer.
    update.buf_alloc = 1 << 20;
    update.fwd_cnt = 14_000;
    vm.send_now(&update, &[]);
    got.extend(payload(vm.recv()));
    assert_eq!(got, data);
}

#[test]
fn host_data_waits_for_guest_rx_buffers_without_spinning() {
    let mut vm = TestVm::with(Options { rx_buffers: 1, ..Options::default() });
    vm.auto_refill = false;
    let (mut host, _) = establish(&mut vm, AGENT_PORT);
    let data = pattern(10_000, 2);
    host.write_all(&data).unwrap();
    vm.pump();
    assert!(vm.recv().is_empty());
    assert_eq!(vm.spurious_events(), 0, "data but no RX buffer must not spin");

    vm.post_rx(1);
    vm.pump();
    let first = only(vm.recv());
    assert_eq!(first.data.len(), 4096);
    vm.post_rx(10);
    vm.pump();
    let mut got = first.data;
    got.extend(payload(vm.recv()));
    assert_eq!(got, data);
}

#[test]
fn header_only_rx_buffers_carry_control_packets_and_never_hang_data() {
    let mut vm = TestVm::with(Options { rx_capacity: 0, ..Options::default() });
    let (mut host, local) = establish(&mut vm, AGENT_PORT);
    host.write_all(b"needs a bigger buffer").unwrap();
    vm.pump();
    assert!(vm.recv().is_empty());
    assert_eq!(vm.spurious_events(), 0);
    // Control packets still fit.
    vm.send_now(&guest_hdr(OP_CREDIT_REQUEST, AGENT_PORT, local), &[]);
    assert_eq!(only(vm.recv()).hdr.op, OP_CREDIT_UPDATE);
}

/// The guest side of one connection's guest -> host flow control.
struct GuestSender {
    sent: usize,
    /// The device's `buf_alloc` and `fwd_cnt`, as last heard.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
}

impl GuestSender {
    fn new() -> Self {
        Self { sent: 0, peer_buf_alloc: CONN_BUF_SIZE, peer_fwd_cnt: 0 }
    }

    fn heard(&mut self, hdr: &PacketHeader) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    fn credit(&self) -> usize {
        let in_flight = self.sent - self.peer_fwd_cnt as usize;
        (self.peer_buf_alloc as usize).checked_sub(in_flight).expect("device forwarded more than was sent?")
    }
}

#[test]
fn guest_to_host_is_buffered_while_the_host_is_slow() {
    let mut vm = TestVm::new();
    let (mut host, local) = establish(&mut vm, AGENT_PORT);
    let data = pattern(1 << 20, 3);
    let mut sender = GuestSender::new();
    // The host reads nothing: the guest sends all its credit allows.
    loop {
        let n = sender.credit().min(64 * 1024).min(data.len() - sender.sent);
        if n == 0 {
            break;
        }
        vm.send_now(&guest_hdr(OP_RW, AGENT_PORT, local), &data[sender.sent..sender.sent + n]);
        sender.sent += n;
        for p in vm.recv() {
            assert_eq!(p.hdr.op, OP_CREDIT_UPDATE);
            sender.heard(&p.hdr);
        }
    }
    assert!(sender.sent > CONN_BUF_SIZE as usize, "the device buffers on top of the socket");
    assert!(sender.sent < data.len());
    assert_eq!(vm.connection_count(), 1);

    // Now the host reads: the device flushes and hands the credit back.
    let mut received = Vec::new();
    for _ in 0..10_000 {
        let (chunk, eof) = read_available(&mut host);
        assert!(!eof);
        received.extend(chunk);
        if received.len() == data.len() {
            break;
        }
        vm.pump();
        for p in vm.recv() {
            assert_eq!(p.hdr.op, OP_CREDIT_UPDATE);
            sender.heard(&p.hdr);
        }
        let n = sender.credit().min(64 * 1024).min(data.len() - sender.sent);
        if n > 0 {
            vm.send_now(&guest_hdr(OP_RW, AGENT_PORT, local), &data[sender.sent..sender.sent + n]);
            sender.sent += n;
        }
    }
    assert!(received == data, "data corrupted or incomplete ({} of {} bytes)", received.len(), data.len());
}

#[test]
fn credit_request_is_answered_with_credit_update() {
    let mut vm = TestVm::new();
    let (_host, local) = establish(&mut vm, AGENT_PORT);
    vm.send_now(&guest_hdr(OP_RW, AGENT_PORT, local), b"12345");
    vm.send_now(&guest_hdr(OP_CREDIT_REQUEST, AGENT_PORT, local), &[]);
    let update = only(vm.recv()).hdr;
    assert_eq!((update.op, update.buf_alloc, update.fwd_cnt), (OP_CREDIT_UPDATE, CONN_BUF_SIZE, 5));
}

#[test]
fn host_half_close_is_a_guest_shutdown_send() {
    let mut vm = TestVm::new();
    let (mut host, local) = establish(&mut vm, AGENT_PORT);
    host.write_all(b"stdin tail").unwrap();
    host.shutdown(Shutdown::Write).unwrap();
    vm.pump();
    let packets = vm.recv();
    assert_eq!(packets.len(), 2, "{packets:?}");
    assert_eq!(packets[0].data, b"stdin tail");
    assert_eq!((packets[1].hdr.op, packets[1].hdr.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    // The other direction still works.
    vm.send_now(&guest_hdr(OP_RW, AGENT_PORT, local), b"exit status");
    assert_eq!(read_available(&mut host), (b"exit status".to_vec(), false));
    // The guest closes its socket: the device finishes with RST, the host sees EOF.
    let mut shut = guest_hdr(OP_SHUTDOWN, AGENT_PORT, local);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    vm.send_now(&shut, &[]);
    assert_eq!(only(vm.recv()).hdr.op, OP_RST);
    assert_eq!(read_available(&mut host), (vec![], true));
    assert_eq!(vm.connection_count(), 0);
}

#[test]
fn host_close_ends_with_guest_rst_or_a_timeout() {
    let mut vm = TestVm::with(short(Timeouts { close: SHORT, ..Timeouts::default() }));
    let (host, local) = establish(&mut vm, AGENT_PORT);
    drop(host);
    vm.pump();
    let shut = only(vm.recv()).hdr;
    assert_eq!((shut.op, shut.flags), (OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND));
    vm.send_now(&guest_hdr(OP_RST, AGENT_PORT, local), &[]);
    assert_eq!(vm.connection_count(), 0);
    assert!(vm.recv().is_empty());

    // This time the guest never answers.
    let (host, local) = establish(&mut vm, AGENT_PORT);
    drop(host);
    vm.pump();
    assert_eq!(only(vm.recv()).hdr.op, OP_SHUTDOWN);
    vm.pump_for(PAST_SHORT);
    let rst = only(vm.recv()).hdr;
    assert_eq!((rst.op, rst.src_port), (OP_RST, local));
    assert_eq!(vm.connection_count(), 0);
}

#[test]
fn guest_rst_and_shutdown_reach_the_host() {
    let mut vm = TestVm::new();
    let (mut host, local) = establish(&mut vm, AGENT_PORT);
    vm.send_now(&guest_hdr(OP_RST, AGENT_PORT, local), &[]);
    assert_eq!(read_available(&mut host), (vec![], true));
    assert_eq!(vm.connection_count(), 0);
    assert!(vm.recv().is_empty());

    // Guest half-close: the host reads EOF and can still answer.
    let (mut host, local) = establish(&mut vm, AGENT_PORT);
    vm.send(&guest_hdr(OP_RW, AGENT_PORT, local), b"request");
    let mut shut = guest_hdr(OP_SHUTDOWN, AGENT_PORT, local);
    shut.flags = SHUTDOWN_SEND;
    vm.send_now(&shut, &[]);
    assert_eq!(read_available(&mut host), (b"request".to_vec(), true));
    host.write_all(b"response").unwrap();
    vm.pump();
    assert_eq!(payload(vm.recv()), b"response");
    // The host closes too: nothing can flow any more.
    host.shutdown(Shutdown::Write).unwrap();
    vm.pump();
    assert_eq!(only(vm.recv()).hdr.op, OP_RST);
    assert_eq!(vm.connection_count(), 0);
}

#[test]
fn protocol_errors_on_a_connection_reset_it() {
    let mut vm = TestVm::new();
    let (mut host, local) = establish(&mut vm, AGENT_PORT);
    vm.send_now(&guest_hdr(OP_REQUEST, AGENT_PORT, local), &[]);
    let rst = only(vm.recv()).hdr;
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (OP_RST, local, AGENT_PORT));
    assert_eq!(read_available(&mut host), (vec![], true));
    assert_eq!(vm.connection_count(), 0);
}

#[test]
fn packets_for_unknown_connections_or_bad_addresses() {
    let mut vm = TestVm::new();
    vm.send_now(&guest_hdr(OP_RW, 40000, 7777), b"stray");
    let rst = only(vm.recv()).hdr;
    assert_eq!(
        (rst.op, rst.src_cid, rst.dst_cid, rst.src_port, rst.dst_port, rst.type_),
        (OP_RST, VSOCK_HOST_CID, GUEST_CID, 7777, 40000, TYPE_STREAM)
    );
    for op in [OP_SHUTDOWN, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST, OP_RESPONSE, 0, 42] {
        vm.send_now(&guest_hdr(op, 40000, 7777), &[]);
        assert_eq!(only(vm.recv()).hdr.op, OP_RST, "op {op}");
    }
    // An RST for nothing is not answered.
    vm.send_now(&guest_hdr(OP_RST, 40000, 7777), &[]);
    assert!(vm.recv().is_empty());
    // Another VM: refused.
    let mut other_vm = guest_hdr(OP_REQUEST, 40000, AGENT_PORT);
    other_vm.dst_cid = 7;
    vm.send_now(&other_vm, &[]);
    let rst = only(vm.recv()).hdr;
    assert_eq!((rst.op, rst.src_cid, rst.dst_cid), (OP_RST, 7, GUEST_CID));
    // Not a stream socket: refused.
    let mut seqpacket = guest_hdr(OP_REQUEST, 40000, AGENT_PORT);
    seqpacket.type_ = 2;
    vm.send_now(&seqpacket, &[]);
    let rst = only(vm.recv()).hdr;
    assert_eq!((rst.op, rst.type_), (OP_RST, 2));
    // A forged source CID: dropped.
    let mut forged = guest_hdr(OP_REQUEST, 40000, AGENT_PORT);
    forged.src_cid = 99;
    vm.send_now(&forged, &[]);
    assert!(vm.recv().is_empty());
    assert_eq!(vm.connection_count(), 0);
}

#[test]
fn malformed_tx_chains_are_returned_without_stalling_the_queue() {
    let mut vm = TestVm::new();
    vm.mem_write(FREE_MEM, &guest_hdr(OP_REQUEST, 40000, 5000).to_bytes());
    let mut truncated = guest_hdr(OP_RW, 40000, 5000);
    truncated.len = 100;
    vm.mem_write(FREE_MEM + 0x1000, &truncated.to_bytes());
    let mut huge = guest_hdr(OP_RW, 40000, 5000);
    huge.len = 0x10_0000;
    vm.mem_write(FREE_MEM + 0x2000, &huge.to_bytes());

    let before = vm.tx_used();
    let interrupts = vm.interrupt.count();
    vm.send_raw(&[(FREE_MEM, 20, READ)]);
    vm.send_raw(&[(FREE_MEM, 10, READ), (FREE_MEM + 10, 10, READ)]);
    vm.send_raw(&[(0xdead_0000_0000, 44, READ)]);
    vm.send_raw(&[(u64::MAX - 0x10, 44, READ)]);
    vm.send_raw(&[(FREE_MEM + 0x1000, 44 + 10, READ)]);
    vm.send_raw(&[(FREE_MEM + 0x1000, 44, READ), (FREE_MEM + 0x3000, 50, READ)]);
    vm.send_raw(&[(FREE_MEM + 0x2000, 44, READ), (FREE_MEM + 0x4_0000, 0x10_0000, READ)]);
    vm.send_raw(&[(FREE_MEM, 44, READ), (FREE_MEM + 0x100, 16, WRITE)]);
    vm.send_raw(&[(FREE_MEM, 44, READ), (0xdead_0000_0000, 16, READ)]);
    vm.pump();
    assert_eq!(vm.tx_used().wrapping_sub(before), 9, "every chain is returned");
    assert!(vm.interrupt.count() > interrupts);
    assert!(vm.recv().is_empty(), "no packet got through");

    // The queue keeps working.
    vm.send_now(&guest_hdr(OP_REQUEST, 40000, 5000), &[]);
    assert_eq!(only(vm.recv()).hdr.op, OP_RST);
}

#[test]
fn malformed_rx_buffers_are_returned_and_skipped() {
    let mut vm = TestVm::with(Options { rx_buffers: 0, ..Options::default() });
    vm.auto_refill = false;
    vm.post_rx_raw(FREE_MEM, 20, WRITE);
    vm.post_rx_raw(0xdead_0000_0000, 4096, WRITE);
    vm.post_rx_raw(FREE_MEM, 4096, READ);
    vm.post_rx(1);
    vm.send_now(&guest_hdr(OP_RW, 40000, 7777), b"x");
    let packets = vm.recv();
    assert_eq!(vm.rx_empty_returns, 3);
    assert_eq!(only(packets).hdr.op, OP_RST);
}

#[test]
fn every_tx_and_rx_layout_carries_data() {
    let mut vm = TestVm::with(Options { rx_layout: RxLayout::HeaderThenData, ..Options::default() });
    let (mut host, local) = establish(&mut vm, AGENT_PORT);
    let rw = guest_hdr(OP_RW, AGENT_PORT, local);
    let (a, b, c) = (pattern(1000, 4), pattern(5000, 5), pattern(64 * 1024, 6));
    vm.send_with(&rw, &a, TxLayout::OneDescriptor);
    vm.send_with(&rw, &b, TxLayout::HeaderThenData);
    vm.send_with(&rw, &c, TxLayout::Scattered);
    vm.send_with(&guest_hdr(OP_CREDIT_UPDATE, AGENT_PORT, local), &[], TxLayout::OneDescriptor);
    vm.pump();
    assert!(read_available(&mut host).0 == [a, b, c].concat());

    let data = pattern(10_000, 7);
    host.write_all(&data[..5000]).unwrap();
    vm.pump();
    vm.rx_layout = RxLayout::OneDescriptor;
    let mut got = payload(vm.recv());
    host.write_all(&data[5000..]).unwrap();
    vm.pump();
    got.extend(payload(vm.recv()));
    assert_eq!(got, data);
}

#[test]
fn one_interrupt_per_wakeup() {
    let mut vm = TestVm::new();
    let before = vm.interrupt.count();
    for port in [7001, 7002, 7003] {
        vm.send(&guest_hdr(OP_RW, 40000, port), b"stray");
    }
    vm.pump();
    assert_eq!(vm.recv().len(), 3);
    assert_eq!(vm.interrupt.count() - before, 1, "3 TX and 3 RX buffers used in one wakeup");
}

#[test]
fn device_reset_drops_connections_and_reactivation_works() {
    let mut vm = TestVm::new();
    let (mut host, _) = establish(&mut vm, AGENT_PORT);
    let mut waiting = vm.host_connect(AGENT_PORT);
    vm.pump();
    assert_eq!(only(vm.recv()).hdr.op, OP_REQUEST);
    vm.reset_and_reactivate();
    assert_eq!(read_available(&mut host), (vec![], true));
    assert_eq!(read_available(&mut waiting), (vec![], true));
    assert_eq!(vm.connection_count(), 0);
    assert!(vm.recv().is_empty(), "the new driver hears nothing of the old connections");

    let (mut host, _) = establish(&mut vm, AGENT_PORT);
    host.write_all(b"again").unwrap();
    vm.pump();
    assert_eq!(payload(vm.recv()), b"again");
}

/// Megabytes both ways at once, with Linux-sized (4 KiB) RX buffers, the guest
/// returning credit as its application reads: everything arrives intact and the device
/// never sends beyond the guest's credit.
#[test]
fn bulk_transfer_both_ways() {
    const SIZE: usize = 4 << 20;
    let mut vm = TestVm::new();
    let (mut host, local) = establish(&mut vm, AGENT_PORT);
    let to_guest = pattern(SIZE, 10);
    let to_host = pattern(SIZE, 11);
    let (mut host_sent, mut host_got) = (0, Vec::with_capacity(SIZE));
    let mut guest_got = Vec::with_capacity(SIZE);
    let mut guest_fwd_told = 0usize;
    let mut sender = GuestSender::new();
    let hdr = |op, fwd_cnt: usize| {
        let mut hdr = guest_hdr(op, AGENT_PORT, local);
        hdr.fwd_cnt = fwd_cnt as u32;
        hdr
    };

    for _ in 0..200_000 {
        if host_got.len() == SIZE && guest_got.len() == SIZE {
            break;
        }
        if host_sent < SIZE {
            match host.write(&to_guest[host_sent..]) {
                Ok(n) => host_sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => panic!("host write: {e}"),
            }
        }
        let (chunk, eof) = read_available(&mut host);
        assert!(!eof);
        host_got.extend(chunk);
        vm.pump();
        for p in vm.recv() {
            sender.heard(&p.hdr);
            match p.hdr.op {
                OP_RW => guest_got.extend(p.data),
                OP_CREDIT_UPDATE => {}
                op => panic!("unexpected op {op}"),
            }
            assert!(guest_got.len() - guest_fwd_told <= GUEST_BUF_ALLOC as usize, "device exceeded guest credit");
        }
        if guest_got.len() - guest_fwd_told >= 64 * 1024 {
            guest_fwd_told = guest_got.len();
            vm.send(&hdr(OP_CREDIT_UPDATE, guest_fwd_told), &[]);
        }
        for _ in 0..8 {
            let n = sender.credit().min(64 * 1024).min(SIZE - sender.sent);
            if n == 0 {
                break;
            }
            vm.send(&hdr(OP_RW, guest_fwd_told), &to_host[sender.sent..sender.sent + n]);
            sender.sent += n;
        }
        vm.pump();
    }
    assert!(host_got == to_host, "guest -> host: {} of {SIZE} bytes, intact: {}", host_got.len(), to_host.starts_with(&host_got));
    assert!(guest_got == to_guest, "host -> guest: {} of {SIZE} bytes, intact: {}", guest_got.len(), to_guest.starts_with(&guest_got));
    assert_eq!(vm.connection_count(), 1);
}

#[test]
fn a_snapshot_waits_until_no_connection_is_left() {
    let mut vm = TestVm::new();
    use crate::devices::virtio::VirtioDevice;
    let positions = |vm: &TestVm| vm.device.lock().unwrap().queue_positions();
    let idle = positions(&vm).expect("an idle device can be snapshotted");
    assert_eq!(idle.len(), 3, "RX, TX and event queue");

    // A host client that has not said which port it wants, then a live connection:
    // refused, saying why.
    let half_made = UnixStream::connect(&vm.uds).unwrap();
    vm.pump();
    let e = positions(&vm).unwrap_err();
    assert!(e.contains("0 vsock connections and 1 host clients still connecting"), "{e}");
    drop(half_made);
    vm.pump();
    assert!(positions(&vm).is_ok(), "the client left");
    let (host, local) = establish(&mut vm, AGENT_PORT);
    let e = positions(&vm).unwrap_err();
    assert!(e.starts_with("1 vsock connections"), "{e}");

    // Closed from both sides: the positions moved past what the guest and host did.
    drop(host);
    vm.pump();
    assert_eq!(only(vm.recv()).hdr.op, OP_SHUTDOWN);
    vm.send_now(&guest_hdr(OP_RST, AGENT_PORT, local), &[]);
    assert_eq!(vm.connection_count(), 0);
    let after = positions(&vm).expect("no connection left");
    assert!(after[0].next_avail > idle[0].next_avail && after[1].next_avail > idle[1].next_avail, "{after:?}");
    assert_eq!(after[2], idle[2], "the event queue is never used");
}
