//! virtio-net (`wisp_vmm::devices::virtio::net::Net`) on a fake tap (a SOCK_SEQPACKET
//! pair, one frame per packet, as a tap with IFF_VNET_HDR gives them), driven through the
//! device's real event loop: a hostile driver's TX chains (virtio-net header and frame in
//! the data blob) go out to the tap; frames the host sends come into the driver's RX
//! buffers. Input: the accepted feature mask u64, an MTU u16 (0: none), the number of
//! host frames u8 and each as len u16 + bytes, the RX queue (size selector u8, encoded
//! queue), the TX queue (the same), then the data blob. Properties: no panic; every frame
//! on the tap is at most one vnet header plus 65562 bytes; the event loop goes idle.
#![no_main]

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use wisp_fuzz::{
    guest_memory, load_ring, pump, queue_size, ring, seqpacket_pair, write_data, CountingInterrupt, Input,
};
use wisp_vmm::devices::virtio::net::{Net, TapLink, MAX_TX_CHAIN_LEN, QUEUE_SIZE};
use wisp_vmm::devices::virtio::VirtioDevice;

struct FakeTap(OwnedFd);

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl TapLink for FakeTap {
    fn label(&self) -> &str {
        "fuzz tap"
    }
    fn set_offload(&mut self, _: u32) -> io::Result<()> {
        Ok(())
    }
}

fn send(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: sends from a live buffer of the given length.
    unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), libc::MSG_DONTWAIT) };
}

/// Frames on the host end of the tap, drained; returns their lengths.
fn drain(fd: &OwnedFd) -> Vec<usize> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut lens = Vec::new();
    loop {
        // SAFETY: receives into a live buffer of the given length; MSG_TRUNC gives the
        // frame's real length.
        let n = unsafe {
            libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_TRUNC)
        };
        if n < 0 {
            return lens;
        }
        lens.push(n as usize);
    }
}

fuzz_target!(|data: &[u8]| {
    wisp_fuzz::init_process();
    let mut input = Input::new(data);
    let features = input.u64();
    let mtu = input.u16();
    let frames: Vec<Vec<u8>> = (0..input.u8() % 8)
        .map(|_| {
            let len = usize::from(input.u16() % 2048);
            input.bytes(len).to_vec()
        })
        .collect();
    let mem = guest_memory();
    let rx = ring(&mem, 0, queue_size(input.u8(), QUEUE_SIZE));
    load_ring(&rx, &mut input);
    let tx = ring(&mem, 1, queue_size(input.u8(), QUEUE_SIZE));
    load_ring(&tx, &mut input);
    write_data(&mem, input.rest());

    let (dev_end, host) = seqpacket_pair();
    let mtu = (mtu != 0).then_some(mtu);
    let Ok(net) = Net::new(Box::new(FakeTap(dev_end)), [2, 0, 0, 0x12, 0x34, 0x56], mtu) else { return };
    let device = Arc::new(Mutex::new(net));
    let mut events = EventManager::new().unwrap();
    events.add_subscriber(device.clone());
    pump(&mut events);
    let event_idx;
    {
        let mut dev = device.lock().unwrap();
        let accepted = features & dev.avail_features();
        event_idx = accepted & (1 << 29) != 0;
        dev.set_acked_features(accepted);
        let interrupt = Arc::new(CountingInterrupt::default());
        dev.activate(
            mem.clone(),
            interrupt,
            vec![rx.queue_with_event_idx(event_idx), tx.queue_with_event_idx(event_idx)],
        )
        .unwrap();
    }
    pump(&mut events);
    for frame in &frames {
        send(&host, frame);
    }
    for queue in 0..2 {
        device.lock().unwrap().queue_events()[queue].write(1).unwrap();
    }
    pump(&mut events);
    for len in drain(&host) {
        assert!(len <= MAX_TX_CHAIN_LEN, "a frame of {len} bytes reached the tap");
    }
    assert!(device.lock().unwrap().reset());
    pump(&mut events);
});
