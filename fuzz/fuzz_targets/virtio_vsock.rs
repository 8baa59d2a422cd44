//! virtio-vsock (`wisp_vmm::devices::virtio::vsock::Vsock`) with its hybrid-vsock muxer,
//! driven through the device's real event loop as the VMM's device thread drives it: a
//! hostile driver's TX packets (headers and payloads in the data blob) and RX buffers,
//! a host program listening on guest-initiated port 1024 (`<uds>_1024`), and optionally
//! a host client that connects to the device's socket and sends a `CONNECT` line.
//! Input: flags u8 (bit 0: a host client connects; bit 1 EVENT_IDX), the client's guest
//! port u32, the RX queue (size selector u8, encoded queue), the TX queue (the same),
//! then the data blob. Properties: no panic; the event loop goes idle (no busy loop).
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use wisp_fuzz::{guest_memory, load_ring, pump, queue_size, ring, write_data, CountingInterrupt, Input};
use wisp_vmm::devices::virtio::vsock::Vsock;
use wisp_vmm::devices::virtio::VirtioDevice;

/// The device's queue size (vsock's `QUEUE_SIZE`, not exported).
const QUEUE_SIZE: u16 = 256;

fuzz_target!(|data: &[u8]| {
    wisp_fuzz::init_process();
    let mut input = Input::new(data);
    let flags = input.u8();
    let event_idx = flags & 2 != 0;
    let client_port = input.u32();
    let mem = guest_memory();
    let rx = ring(&mem, 0, queue_size(input.u8(), QUEUE_SIZE));
    load_ring(&rx, &mut input);
    let tx = ring(&mem, 1, queue_size(input.u8(), QUEUE_SIZE));
    load_ring(&tx, &mut input);
    let event = ring(&mem, 2, 16);
    write_data(&mem, input.rest());

    let dir = tempfile::tempdir_in(wisp_fuzz::scratch_dir()).unwrap();
    let uds = dir.path().join("v.sock");
    let _host_service = UnixListener::bind(dir.path().join("v.sock_1024")).unwrap();
    let device = Arc::new(Mutex::new(Vsock::new(3, uds.clone()).unwrap()));
    let mut events = EventManager::new().unwrap();
    events.add_subscriber(device.clone());
    pump(&mut events);
    {
        let mut dev = device.lock().unwrap();
        let features = dev.avail_features();
        dev.set_acked_features(features);
        let interrupt = Arc::new(CountingInterrupt::default());
        let queues = vec![
            rx.queue_with_event_idx(event_idx),
            tx.queue_with_event_idx(event_idx),
            event.queue_with_event_idx(event_idx),
        ];
        dev.activate(mem.clone(), interrupt, queues).unwrap();
    }
    let _client = (flags & 1 != 0).then(|| {
        let mut c = UnixStream::connect(&uds).unwrap();
        c.write_all(format!("CONNECT {client_port}\nhello").as_bytes()).unwrap();
        c
    });
    pump(&mut events);
    for queue in 0..2 {
        device.lock().unwrap().queue_events()[queue].write(1).unwrap();
    }
    pump(&mut events);
    assert!(device.lock().unwrap().reset());
    pump(&mut events);
});
