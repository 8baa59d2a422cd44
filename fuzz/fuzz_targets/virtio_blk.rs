//! virtio-blk request handling (`wisp_vmm::devices::virtio::block::Block`) on a scratch
//! disk image: a hostile driver's request queue (see `wisp_fuzz::load_ring`; headers,
//! data and status bytes live in the data blob) is served by the real device code, as
//! the device thread serves a kick. Input: flags u8 (bit 0 read-only disk, bit 1
//! EVENT_IDX), queue size selector u8, one encoded queue, the data blob.
//! Properties: no panic; the image never changes size; a read-only image never changes.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use wisp_fuzz::{guest_memory, load_ring, queue_size, ring, write_data, CountingInterrupt, Input};
use wisp_vmm::devices::virtio::block::{Block, QUEUE_SIZE};
use wisp_vmm::devices::virtio::VirtioDevice;

const SECTORS: usize = 64;

fuzz_target!(|data: &[u8]| {
    wisp_fuzz::init_process();
    let mut input = Input::new(data);
    let flags = input.u8();
    let read_only = flags & 1 != 0;
    let size = queue_size(input.u8(), QUEUE_SIZE);
    let mem = guest_memory();
    let ring = ring(&mem, 0, size);
    load_ring(&ring, &mut input);
    write_data(&mem, input.rest());

    let image = tempfile::NamedTempFile::new_in(wisp_fuzz::scratch_dir()).unwrap();
    let content: Vec<u8> = (0..SECTORS).flat_map(|n| [n as u8; 512]).collect();
    std::fs::write(image.path(), &content).unwrap();
    let mut block = Block::new(image.path(), read_only, Some("fuzz-disk".into())).unwrap();
    block.set_acked_features(block.avail_features());
    let interrupt = Arc::new(CountingInterrupt::default());
    block.activate(mem.clone(), interrupt, vec![ring.queue_with_event_idx(flags & 2 != 0)]).unwrap();
    block.handle_queue_event();
    block.handle_queue_event();
    assert!(block.reset());
    drop(block);

    let after = std::fs::read(image.path()).unwrap();
    assert_eq!(after.len(), content.len(), "the guest changed the disk's size");
    if read_only {
        assert!(after == content, "a read-only disk was written");
    }
});
