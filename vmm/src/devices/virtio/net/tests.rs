//! Device-level tests: a guest driver (`test_utils::TestNet`) and a fake tap (one end of
//! a SOCK_SEQPACKET socketpair) talk through the device and its event loop.

use virtio_bindings::bindings::virtio_net::*;
use virtio_bindings::bindings::virtio_ring::VRING_USED_F_NO_NOTIFY;

use super::device::{tap_offloads, RXQ, TXQ};
use super::test_utils::{frame, refusing_tap, Options, TestNet, EVENT_IDX, GUEST_MAC, MEM_SIZE, NEXT, READ, WRITE};
use super::*;
use crate::devices::virtio::test_utils::RecordingInterrupt;
use crate::devices::virtio::{
    ActivateError, InterruptKind, Queue, QueuePosition, QueueT, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1,
};

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Everything but the data of received frames: checks and strips the headers.
fn rx_data(t: &mut TestNet) -> Vec<Vec<u8>> {
    let (frames, empty) = t.rx_frames();
    assert_eq!(empty, 0, "chains returned empty");
    frames.into_iter().map(|f| f.data).collect()
}

#[test]
fn offers_the_documented_features() {
    let t = TestNet::with(Options { activate: false, ..Options::default() });
    let dev = t.device.lock().unwrap();
    assert_eq!(dev.device_type(), TYPE_NET);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(dev.queue_events().len(), 2);
    let want = VIRTIO_F_VERSION_1
        | bit(VIRTIO_NET_F_CSUM)
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_HOST_TSO4)
        | bit(VIRTIO_NET_F_HOST_TSO6)
        | bit(VIRTIO_NET_F_MAC)
        | bit(VIRTIO_NET_F_STATUS)
        | bit(VIRTIO_NET_F_MRG_RXBUF)
        | EVENT_IDX;
    assert_eq!(dev.avail_features(), want, "no MTU feature without an MTU");
    drop(dev);
    let t = TestNet::with(Options { activate: false, mtu: Some(9000), ..Options::default() });
    assert_eq!(t.device.lock().unwrap().avail_features(), want | bit(VIRTIO_NET_F_MTU));
}

#[test]
fn acked_features_are_masked_with_the_offer() {
    let t = TestNet::with(Options { activate: false, ..Options::default() });
    let mut dev = t.device.lock().unwrap();
    dev.set_acked_features(u64::MAX);
    assert_eq!(dev.acked_features, dev.avail_features());
    dev.set_acked_features(bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_GUEST_UFO));
    assert_eq!(dev.acked_features, 0);
}

#[test]
fn config_space_has_mac_status_and_mtu() {
    let t = TestNet::with(Options { mtu: Some(1400), ..Options::default() });
    let config = t.config(0, 12);
    assert_eq!(&config[..6], &GUEST_MAC);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), VIRTIO_NET_S_LINK_UP as u16);
    assert_eq!(u16::from_le_bytes([config[8], config[9]]), 1, "max_virtqueue_pairs");
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1400);
    // Byte-wise and unaligned reads, as Linux reads the MAC.
    for i in 0..6 {
        assert_eq!(t.config(i, 1), vec![GUEST_MAC[i as usize]]);
    }
    assert_eq!(t.config(4, 4), vec![0x34, 0x56, 1, 0]);
    assert_eq!(t.config(10, 4), vec![0x78, 0x05, 0, 0], "past the end reads as zero");
    assert_eq!(t.config(64, 4), vec![0; 4]);
    assert_eq!(t.config(u64::MAX - 1, 4), vec![0; 4]);
    // The driver cannot change anything.
    t.device.lock().unwrap().write_config(0, &[0xff; 8]);
    assert_eq!(&t.config(0, 6), &GUEST_MAC);
    // Without an MTU the field reads 0 (and the feature is not offered).
    let t = TestNet::new();
    assert_eq!(t.config(10, 2), vec![0, 0]);
}

#[test]
fn device_refuses_multicast_macs_and_tiny_mtus() {
    let (tap, _host) = refusing_tap();
    assert!(matches!(Net::new(tap, [0x01, 0, 0, 0, 0, 1], None), Err(NetError::Mac(..))));
    let (tap, _host) = refusing_tap();
    assert!(matches!(Net::new(tap, GUEST_MAC, Some(67)), Err(NetError::Mtu(67))));
}

#[test]
fn mac_addresses_parse_and_print() {
    let mac = MacAddr::parse("02:AB:cd:00:10:ff").unwrap();
    assert_eq!(mac.0, [0x02, 0xab, 0xcd, 0x00, 0x10, 0xff]);
    assert_eq!(mac.to_string(), "02:ab:cd:00:10:ff");
    for bad in
        ["", "02:00:00:00:00", "02:00:00:00:00:00:00", "02:00:00:00:00:0", "02:00:00:00:00:+1", "0x:00:00:00:00:01"]
    {
        assert!(MacAddr::parse(bad).unwrap_err().contains("is not a MAC address"), "{bad}");
    }
    assert!(MacAddr::parse("ff:ff:ff:ff:ff:ff").unwrap_err().contains("multicast"));
    assert!(MacAddr::parse("00:00:00:00:00:00").unwrap_err().contains("all-zero"));
}

#[test]
fn tap_offloads_follow_the_accepted_guest_features() {
    let csum = bit(VIRTIO_NET_F_GUEST_CSUM);
    let (tso4, tso6) = (bit(VIRTIO_NET_F_GUEST_TSO4), bit(VIRTIO_NET_F_GUEST_TSO6));
    let host_side = bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6);
    let cases = [
        (0, 0),
        (host_side, 0),
        (csum, libc::TUN_F_CSUM),
        (csum | tso4, libc::TUN_F_CSUM | libc::TUN_F_TSO4),
        (csum | tso6, libc::TUN_F_CSUM | libc::TUN_F_TSO6),
        (csum | tso4 | tso6, libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6),
        // TSO without partial checksums is invalid: no offloads at all.
        (tso4 | tso6, 0),
    ];
    for (acked, want) in cases {
        assert_eq!(tap_offloads(acked), want, "acked {acked:#x}");
        let t = TestNet::with(Options { features: VIRTIO_F_VERSION_1 | acked, ..Options::default() });
        assert_eq!(*t.offloads.lock().unwrap(), vec![want], "activation with {acked:#x}");
    }
}

#[test]
fn activation_needs_two_queues_and_working_offloads() {
    let mut t = TestNet::with(Options { activate: false, ..Options::default() });
    let mem = t.mem.clone();
    let err = t.device.lock().unwrap().activate(mem.clone(), RecordingInterrupt::new(), vec![t.rx.queue()]);
    assert!(matches!(err, Err(ActivateError::QueueCount { got: 1, want: 2 })));
    assert!(!t.device.lock().unwrap().is_activated());
    t.activate();
    assert!(t.device.lock().unwrap().is_activated());
    let again = t.device.lock().unwrap().activate(mem.clone(), RecordingInterrupt::new(), vec![]);
    assert!(matches!(again, Err(ActivateError::Device(_))));

    let (tap, _host) = refusing_tap();
    let mut net = Net::new(tap, GUEST_MAC, None).unwrap();
    net.set_acked_features(net.avail_features());
    let queues = vec![Queue::new(16).unwrap(), Queue::new(16).unwrap()];
    let err = net.activate(mem, RecordingInterrupt::new(), queues).unwrap_err();
    assert!(err.to_string().contains("TUNSETOFFLOAD"), "{err}");
    assert!(!net.is_activated());
}

#[test]
fn tx_single_descriptor_frame_reaches_the_tap() {
    let mut t = TestNet::new();
    let f = frame(1500, 1);
    let head = t.send(&[&f]);
    t.pump();
    assert_eq!(t.host_recv(), vec![f]);
    assert_eq!(t.tx.take_used(), vec![(head, 0)]);
    assert_eq!(t.interrupt.take(), vec![InterruptKind::Queue]);
    assert_eq!(t.spurious_events(), 0, "an idle device must not wake the loop");
}

#[test]
fn tx_multi_descriptor_frames_are_gathered_in_order() {
    let mut t = TestNet::new();
    let f = frame(4000, 2);
    // Header alone, then the frame in uneven pieces, as Linux does without indirect descriptors.
    t.send(&[&f[..12], &f[12..100], &f[100..3000], &f[3000..]]);
    // Header split across descriptors too.
    let g = frame(64, 3);
    t.send(&[&g[..5], &g[5..20], &g[20..]]);
    // A 64 KiB GSO frame, the largest allowed.
    let big = frame(MAX_FRAME_LEN, 4);
    t.send(&[&big[..12], &big[12..40000], &big[40000..]]);
    t.pump();
    assert_eq!(t.host_recv(), vec![f, g, big]);
    assert_eq!(t.tx.take_used().len(), 3);
}

#[test]
fn malformed_tx_chains_are_dropped_and_the_queue_keeps_working() {
    let mut t = TestNet::new();
    let a = t.alloc(MAX_TX_CHAIN_LEN as u32 + 16);
    // One byte too long, over two descriptors.
    t.send_raw(&[(a, 12, READ), (a + 12, MAX_FRAME_LEN as u32 + 1, READ)]);
    // A buffer past the end of guest memory, and one at an absurd address.
    t.send_raw(&[(a, 12, READ), (MEM_SIZE as u64 - 8, 64, READ)]);
    t.send_raw(&[(u64::MAX - 16, 128, READ)]);
    // A device-writable descriptor.
    t.send_raw(&[(a, 12, READ), (a + 12, 64, WRITE)]);
    // Shorter than a virtio-net header plus an Ethernet header.
    t.send_raw(&[(a, 25, READ)]);
    // A loop: 3 -> 4 -> 3 ...
    t.tx.set_desc(30, a, 40, READ | NEXT, 31);
    t.tx.set_desc(31, a, 40, READ | NEXT, 30);
    t.tx.offer(30);
    // A next index past the table.
    t.tx.set_desc(40, a, 40, READ | NEXT, 999);
    t.tx.offer(40);
    let good = frame(100, 5);
    t.send(&[&good]);
    t.pump();
    assert_eq!(t.host_recv(), vec![good], "only the good frame reaches the tap");
    let used = t.tx.take_used();
    assert_eq!(used.len(), 8, "every chain comes back: {used:?}");
    assert!(used.iter().all(|&(_, len)| len == 0));
    // A frame of exactly the limit is fine.
    let max = frame(MAX_FRAME_LEN, 6);
    t.send(&[&max]);
    t.pump();
    assert_eq!(t.host_recv().len(), 1);
}

#[test]
fn a_corrupt_avail_index_does_not_spin_the_device() {
    let mut t = TestNet::new();
    t.tx.set_avail_idx(1000);
    t.kick(TXQ);
    t.pump();
    assert_eq!(t.tx.used_idx(), 0);
    t.rx.set_avail_idx(1000);
    t.host_send(&frame(60, 1));
    t.pump();
    assert_eq!(t.spurious_events(), 0);
}

#[test]
fn rx_frame_fills_one_buffer() {
    let mut t = TestNet::new();
    t.post_rx(4, 2048);
    t.pump();
    let mut f = frame(1000, 7);
    f[0] = VIRTIO_NET_HDR_F_DATA_VALID as u8;
    t.host_send(&f);
    t.pump();
    let (frames, empty) = t.rx_frames();
    assert_eq!(empty, 0);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].lens, vec![1012]);
    assert_eq!(frames[0].num_buffers(), 1);
    assert_eq!(frames[0].hdr[0], VIRTIO_NET_HDR_F_DATA_VALID as u8, "GUEST_CSUM accepted: flags kept");
    assert_eq!(frames[0].data, f[12..]);
    assert_eq!(t.interrupt.take(), vec![InterruptKind::Queue]);
}

#[test]
fn rx_frame_spreads_over_mergeable_buffers() {
    let mut t = TestNet::new();
    t.post_rx(8, 256);
    t.pump();
    let f = frame(1000, 8);
    t.host_send(&f);
    let small = frame(100, 9);
    t.host_send(&small);
    t.pump();
    let (frames, _) = t.rx_frames();
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0].num_buffers(), 4);
    assert_eq!(frames[0].lens, vec![256, 256, 256, 244]);
    assert_eq!(frames[0].data, f[12..]);
    assert_eq!((frames[1].num_buffers(), frames[1].data.as_slice()), (1, &small[12..]));
}

#[test]
fn rx_64k_gso_frame_over_page_sized_buffers() {
    let mut t = TestNet::new();
    t.post_rx(40, 4096);
    t.pump();
    let mut f = frame(MAX_FRAME_LEN, 10);
    f[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    f[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    t.host_send(&f);
    t.pump();
    let (frames, _) = t.rx_frames();
    assert_eq!(frames.len(), 1);
    assert_eq!(usize::from(frames[0].num_buffers()), (MAX_FRAME_LEN + 12).div_ceil(4096));
    assert_eq!(frames[0].hdr[..2], f[..2]);
    assert_eq!(frames[0].data, f[12..]);
}

#[test]
fn rx_chains_with_several_descriptors() {
    let mut t = TestNet::new();
    let (a, b) = (t.alloc(12), t.alloc(3000));
    let head = t.post_rx_chain(&[(a, 12, WRITE), (b, 3000, WRITE)]);
    t.kick(RXQ);
    let f = frame(1400, 11);
    t.host_send(&f);
    t.pump();
    let (frames, _) = t.rx_frames();
    assert_eq!(frames[0].data, f[12..]);
    assert_eq!(frames[0].lens, vec![1412]);
    assert_eq!(head, 0);
}

#[test]
fn rx_without_mergeable_buffers_needs_one_chain_per_frame() {
    let features = !EVENT_IDX & !bit(VIRTIO_NET_F_MRG_RXBUF);
    let mut t = TestNet::with(Options { features, ..Options::default() });
    t.post_rx(2, 1526);
    t.pump();
    let big = frame(3000, 12);
    let ok = frame(1500, 13);
    t.host_send(&big);
    t.host_send(&ok);
    t.pump();
    let (frames, empty) = t.rx_frames();
    assert_eq!(empty, 0, "the too-small chain is kept for the next frame");
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].num_buffers(), 1, "num_buffers is 1 without MRG_RXBUF");
    assert_eq!(frames[0].data, ok[12..]);
}

#[test]
fn rx_waits_for_buffers_and_resumes_on_the_kick() {
    let mut t = TestNet::new();
    let (f1, f2, f3) = (frame(200, 14), frame(300, 15), frame(400, 16));
    t.host_send(&f1);
    t.host_send(&f2);
    t.pump();
    assert_eq!(t.rx.used_idx(), 0);
    assert_eq!(t.device.lock().unwrap().rx.pending(), Some(212), "the frame read waits, not dropped");
    assert_eq!(t.spurious_events(), 0, "no busy loop on a readable tap while starved");
    assert_eq!(t.rx.used_flags(), 0, "RX notifications are on while starved");
    t.post_rx(1, 1024);
    t.pump();
    // One buffer: the pending frame; the next one waits again.
    assert_eq!(rx_data(&mut t), vec![f1[12..].to_vec()]);
    t.host_send(&f3);
    t.post_rx(4, 1024);
    t.pump();
    assert_eq!(rx_data(&mut t), vec![f2[12..].to_vec(), f3[12..].to_vec()]);
    assert_eq!(t.rx.used_flags(), VRING_USED_F_NO_NOTIFY as u16, "kicks are off while buffers last");
}

#[test]
fn rx_frame_waits_for_enough_mergeable_buffers() {
    let mut t = TestNet::new();
    t.post_rx(2, 1024);
    t.pump();
    let f = frame(4000, 17);
    t.host_send(&f);
    t.pump();
    assert_eq!(t.rx.used_idx(), 0, "nothing written before the whole frame has room");
    t.post_rx(2, 1024);
    t.pump();
    let (frames, _) = t.rx_frames();
    assert_eq!(frames[0].num_buffers(), 4);
    assert_eq!(frames[0].data, f[12..]);
}

#[test]
fn malformed_rx_chains_are_returned_empty() {
    let mut t = TestNet::new();
    let a = t.alloc(2048);
    t.post_rx_chain(&[(a, 2048, READ)]);
    t.post_rx_chain(&[(MEM_SIZE as u64 - 100, 2048, WRITE)]);
    t.post_rx_chain(&[(u64::MAX - 10, 2048, WRITE)]);
    t.post_rx_chain(&[(a, 8, WRITE)]);
    t.post_rx_chain(&[(a, 64, WRITE), (a + 64, 2048, READ)]);
    t.rx.set_desc(100, a, 64, WRITE | NEXT, 101);
    t.rx.set_desc(101, a, 64, WRITE | NEXT, 100);
    t.rx.offer(100);
    t.post_rx(1, 2048);
    let f = frame(1000, 18);
    t.host_send(&f);
    t.pump();
    let (frames, empty) = t.rx_frames();
    assert_eq!(empty, 6);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].data, f[12..]);
    assert_eq!(t.mem_read(a, 16), vec![0; 16], "a device-readable buffer is not written");
}

#[test]
fn a_frame_that_can_never_fit_is_dropped() {
    // 16 descriptors of 64 bytes: 1 KiB is all the guest can ever post.
    let mut t = TestNet::with(Options { queue_size: 16, ..Options::default() });
    t.post_rx(16, 64);
    t.pump();
    t.host_send(&frame(2000, 19));
    let small = frame(40, 20);
    t.host_send(&small);
    t.pump();
    assert_eq!(rx_data(&mut t), vec![small[12..].to_vec()]);
}

#[test]
fn rx_drops_offloads_the_guest_did_not_accept() {
    let features = VIRTIO_F_VERSION_1 | bit(VIRTIO_NET_F_MRG_RXBUF);
    let mut t = TestNet::with(Options { features, ..Options::default() });
    assert_eq!(*t.offloads.lock().unwrap(), vec![0]);
    t.post_rx(4, 2048);
    let mut gso = frame(1000, 21);
    gso[1] = VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    t.host_send(&gso);
    let mut flagged = frame(100, 22);
    flagged[0] = VIRTIO_NET_HDR_F_DATA_VALID as u8;
    t.host_send(&flagged);
    t.pump();
    let (frames, _) = t.rx_frames();
    assert_eq!(frames.len(), 1, "the GSO frame is dropped");
    assert_eq!(frames[0].hdr[0], 0, "no checksum flags without GUEST_CSUM");
    assert_eq!(frames[0].data, flagged[12..]);
}

#[test]
fn nothing_is_read_from_the_tap_before_activation() {
    let mut t = TestNet::with(Options { activate: false, ..Options::default() });
    let f = frame(100, 23);
    t.host_send(&f);
    t.pump();
    assert_eq!(t.spurious_events(), 0);
    t.activate();
    t.post_rx(2, 2048);
    t.pump();
    assert_eq!(rx_data(&mut t), vec![f[12..].to_vec()]);
}

#[test]
fn tx_waits_while_the_tap_is_full() {
    let mut t = TestNet::new();
    let sndbuf: libc::c_int = 64 * 1024;
    let fd = t.device.lock().unwrap().link.as_raw_fd();
    // SAFETY: setsockopt reads one int through a valid pointer.
    let ret =
        unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, (&sndbuf as *const libc::c_int).cast(), 4) };
    assert_eq!(ret, 0);
    let frames: Vec<Vec<u8>> = (0..32).map(|i| frame(16 * 1024, 100 + i)).collect();
    for f in &frames {
        t.send(&[f]);
    }
    t.pump();
    let first = t.tx.take_used().len();
    assert!(first > 0 && first < frames.len(), "{first} of {} sent before the tap filled up", frames.len());
    assert!(t.device.lock().unwrap().tx.blocked());
    assert_eq!(t.spurious_events(), 0, "no busy loop on a full tap");
    let mut got = Vec::new();
    for _ in 0..100 {
        got.extend(t.host_recv());
        t.pump();
        if got.len() == frames.len() {
            break;
        }
    }
    assert_eq!(got, frames, "every frame arrives once, in order");
    assert_eq!(first + t.tx.take_used().len(), frames.len());
    assert!(!t.device.lock().unwrap().tx.blocked());
}

#[test]
fn event_idx_suppresses_kicks_and_interrupts() {
    let mut t = TestNet::with(Options { features: u64::MAX, ..Options::default() });
    assert!(t.event_idx);
    // TX: the device asks to be kicked for the next chain after the ones it consumed.
    t.tx.set_used_event(2);
    for i in 0..2 {
        t.send(&[&frame(100, i)]);
    }
    t.pump();
    assert_eq!(t.host_recv().len(), 2);
    assert_eq!(t.tx.avail_event(), 2);
    assert_eq!(t.interrupt.take(), vec![], "used_event 2 not reached yet");
    t.send(&[&frame(100, 3)]);
    t.pump();
    assert_eq!(t.interrupt.take(), vec![InterruptKind::Queue], "used index passed used_event");
    assert_eq!(t.tx.avail_event(), 3);
    // RX: buffers are consumed without asking for kicks until the device runs dry.
    t.rx.set_used_event(u16::MAX);
    t.post_rx(2, 2048);
    t.pump();
    let before = t.rx.avail_event();
    t.host_send(&frame(100, 4));
    t.host_send(&frame(100, 5));
    t.host_send(&frame(100, 6));
    t.pump();
    assert_eq!(t.rx.used_idx(), 2);
    assert_eq!(before, 0);
    assert_eq!(t.rx.avail_event(), 2, "starved: kick me when buffer 2 comes");
    assert_eq!(t.interrupt.take(), vec![], "RX used_event not reached");
    t.rx.set_used_event(2);
    t.post_rx(1, 2048);
    t.pump();
    assert_eq!(t.rx.used_idx(), 3);
    assert_eq!(t.interrupt.take(), vec![InterruptKind::Queue]);
}

#[test]
fn reset_drops_the_waiting_frame_and_reactivation_works() {
    let mut t = TestNet::new();
    t.host_send(&frame(100, 30));
    t.pump();
    assert!(t.device.lock().unwrap().rx.pending().is_some());
    t.reset_and_reactivate();
    assert!(t.device.lock().unwrap().rx.pending().is_none());
    assert_eq!(t.offloads.lock().unwrap().len(), 2, "offloads set again on reactivation");
    let f = frame(200, 31);
    t.host_send(&f);
    t.post_rx(2, 2048);
    t.pump();
    assert_eq!(rx_data(&mut t), vec![f[12..].to_vec()]);
    let g = frame(300, 32);
    t.send(&[&g]);
    t.pump();
    assert_eq!(t.host_recv(), vec![g]);
}

#[test]
fn a_failed_tap_takes_the_link_down() {
    let mut t = TestNet::new();
    t.post_rx(2, 2048);
    t.pump();
    t.interrupt.take();
    // The host end goes away: EOF on the device's end.
    let host = std::mem::replace(&mut t.host, super::test_utils::seqpacket_pair().0);
    drop(host);
    t.pump();
    assert_eq!(t.config(6, 2), vec![0, 0], "link down");
    assert_eq!(t.interrupt.take(), vec![InterruptKind::Config]);
    assert_eq!(t.spurious_events(), 0, "the failed tap is out of the event loop");
    // TX still returns the guest's buffers.
    t.send(&[&frame(100, 33)]);
    t.pump();
    assert_eq!(t.tx.take_used().len(), 1);
}

impl TestNet {
    fn mem_read(&self, addr: u64, len: usize) -> Vec<u8> {
        use vm_memory::{Bytes, GuestAddress};
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }
}

#[test]
fn a_snapshot_gives_back_the_chains_a_waiting_frame_took() {
    let mut t = TestNet::new();
    assert_eq!(t.device.lock().unwrap().queue_positions().unwrap().len(), 2, "receive and transmit");
    t.post_rx(2, 1024);
    t.pump();
    t.host_send(&frame(4000, 17));
    t.pump();
    assert_eq!(t.rx.used_idx(), 0, "the frame waits for more buffers");
    let device = t.device.lock().unwrap();
    assert_eq!(device.rx.reserved_chains(), 2, "it holds both chains the guest posted");
    let positions = device.queue_positions().unwrap();
    assert_eq!(QueuePosition::of(&device.active.as_ref().unwrap().rx).next_avail, 2);
    assert_eq!(positions[RXQ].next_avail, 0, "a restored device takes both chains again");
    assert_eq!(positions[RXQ].next_used, 0);
}
