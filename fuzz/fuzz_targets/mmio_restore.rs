//! A virtio-mmio transport restored from a snapshot's transport state
//! (`wisp_vmm::snapshot::TransportState::decode`, then `MmioTransport::restore`) in front
//! of a real virtio-rng device, then the device serving its queue from where the state
//! says it was: a snapshot file is hostile input, and this is where its registers,
//! queue addresses and queue positions reach the device. Input: the encoded state, then
//! one encoded queue (`wisp_fuzz::load_ring`) laid out at address 0 and the data blob.
//! Properties: no panic; what decodes encodes back to its bytes; a restored transport
//! has its device active exactly when the state's status has DRIVER_OK without
//! NEEDS_RESET (and no refused reactivation), and saves a state that restores again.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use wisp_fuzz::{guest_memory, load_ring, ring, write_data, Input};
use wisp_vmm::devices::virtio::mmio::MmioTransport;
use wisp_vmm::devices::virtio::rng::{Rng, QUEUE_SIZE};
use wisp_vmm::devices::virtio::VirtioDevice;
use wisp_vmm::snapshot::codec::{Reader, Writer};
use wisp_vmm::snapshot::TransportState;

const DRIVER_OK: u32 = 4;
const NEEDS_RESET: u32 = 0x40;

fuzz_target!(|data: &[u8]| {
    wisp_fuzz::init_process();
    let mut reader = Reader::new(data);
    let Ok(state) = TransportState::decode(&mut reader) else { return };
    let used = reader.position();
    let mut w = Writer::new();
    state.encode(&mut w);
    assert_eq!(w.into_bytes(), &data[..used], "a decoded state does not encode back to its bytes");

    let mut input = Input::new(&data[used..]);
    let mem = guest_memory();
    let queue = ring(&mem, 0, QUEUE_SIZE);
    load_ring(&queue, &mut input);
    write_data(&mem, input.rest());

    let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
    let Ok(transport) = MmioTransport::restore(mem.clone(), rng.clone(), &state) else { return };
    let running =
        state.device_status & DRIVER_OK != 0 && state.device_status & NEEDS_RESET == 0 && !state.reactivation_refused;
    assert_eq!(rng.lock().unwrap().is_activated(), running, "status {:#x}", state.device_status);
    rng.lock().unwrap().handle_queue_event();
    let saved = transport.save_state().expect("a restored transport saves its state");
    MmioTransport::restore(mem, Arc::new(Mutex::new(Rng::new().unwrap())), &saved).expect("a saved state restores");
});
