//! virtio-fs (`wisp_vmm::devices::virtio::fs::SharedDir`): FUSE requests from a hostile
//! driver, served by the real device code and fuse-backend-rs's passthrough (behind
//! wisp's `GuardedFs`) over a fresh temporary share holding a file, a directory and a
//! symlink that points out of the share. Input: flags u8 (bit 0 read-only share, bit 1
//! EVENT_IDX), for the hiprio queue and then the request queue a size selector u8 and
//! an encoded queue (`wisp_fuzz::load_ring`), then the data blob (the FUSE requests and
//! room for replies). Files the guest grows are capped at 64 MiB (RLIMIT_FSIZE).
//! Properties: no panic; nothing outside the share changes; a read-only share does not
//! change.
#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use wisp_fuzz::{guest_memory, load_ring, queue_size, ring, write_data, CountingInterrupt, Input};
use wisp_vmm::devices::virtio::fs::{SharedDir, SharedDirConfig, HIPRIO_QUEUE_SIZE, QUEUE_SIZE};
use wisp_vmm::devices::virtio::VirtioDevice;

/// Names and contents in a directory, recursively (symlinks as their targets).
fn snapshot(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let name = p.display().to_string();
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.file_type().is_symlink() {
            out.push((name, std::fs::read_link(&p).unwrap().into_os_string().into_encoded_bytes()));
        } else if meta.is_dir() {
            out.push((name, b"<dir>".to_vec()));
            snapshot(&p, out);
        } else {
            out.push((name, std::fs::read(&p).unwrap_or_default()));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    wisp_fuzz::init_process();
    let mut input = Input::new(data);
    let flags = input.u8();
    let read_only = flags & 1 != 0;
    let event_idx = flags & 2 != 0;
    let mem = guest_memory();
    let hiprio = ring(&mem, 0, queue_size(input.u8(), HIPRIO_QUEUE_SIZE));
    load_ring(&hiprio, &mut input);
    let requests = ring(&mem, 1, queue_size(input.u8(), QUEUE_SIZE));
    load_ring(&requests, &mut input);
    write_data(&mem, input.rest());

    let top = tempfile::tempdir_in(wisp_fuzz::scratch_dir()).unwrap();
    let share = top.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(top.path().join("outside"), b"not for the guest").unwrap();
    std::fs::write(share.join("file"), b"hello from the host\n").unwrap();
    std::fs::create_dir(share.join("dir")).unwrap();
    std::fs::write(share.join("dir/inner"), b"inner").unwrap();
    std::os::unix::fs::symlink("../outside", share.join("escape")).unwrap();
    let mut before_share = Vec::new();
    snapshot(&share, &mut before_share);

    let mut config = SharedDirConfig::new("fuzz", &share);
    config.read_only = read_only;
    let mut dev = SharedDir::new(&config).unwrap();
    dev.set_acked_features(dev.avail_features());
    let interrupt = Arc::new(CountingInterrupt::default());
    dev.activate(
        mem.clone(),
        interrupt,
        vec![hiprio.queue_with_event_idx(event_idx), requests.queue_with_event_idx(event_idx)],
    )
    .unwrap();
    for _ in 0..2 {
        dev.handle_queue_event(0);
        dev.handle_queue_event(1);
    }
    assert!(dev.reset());
    drop(dev);

    let mut outside = Vec::new();
    for e in std::fs::read_dir(top.path()).unwrap().filter_map(Result::ok) {
        if e.path() != share {
            let content = std::fs::read(e.path()).unwrap_or_else(|_| b"<not a file>".to_vec());
            outside.push((e.path().display().to_string(), content));
        }
    }
    assert_eq!(
        outside,
        vec![(top.path().join("outside").display().to_string(), b"not for the guest".to_vec())],
        "the guest changed something outside its share"
    );
    if read_only {
        let mut after_share = Vec::new();
        snapshot(&share, &mut after_share);
        assert!(after_share == before_share, "a read-only share changed");
    }
});
