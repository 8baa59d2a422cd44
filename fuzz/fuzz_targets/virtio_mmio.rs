//! The virtio-mmio transport (`wisp_vmm::devices::virtio::mmio::MmioTransport`) in front of
//! a real virtio-blk device: the input is a sequence of guest operations, in any order:
//! register reads and writes (any offset, any width), Linux-style "add status bit",
//! queue setup with a sane or a fuzzed layout, writes to guest memory, queue contents
//! (`wisp_fuzz::load_ring`) and kicks served by the device. Properties: no panic; the
//! device is active exactly when the status has DRIVER_OK without NEEDS_RESET; the status
//! never shows a bit without the bits before it.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};
use wisp_fuzz::{guest_memory, load_ring, queue_size, ring, Input, MEM_SIZE};
use wisp_vmm::devices::bus::BusDevice;
use wisp_vmm::devices::virtio::block::Block;
use wisp_vmm::devices::virtio::mmio::MmioTransport;
use wisp_vmm::devices::virtio::VirtioDevice;

const STATUS: u64 = 0x70;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const QUEUE_DESC_LOW: u64 = 0x80;
const QUEUE_AVAIL_LOW: u64 = 0x90;
const QUEUE_USED_LOW: u64 = 0xa0;
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 0x40;

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn write64(t: &mut MmioTransport, low: u64, value: u64) {
    write32(t, low, value as u32);
    write32(t, low + 4, (value >> 32) as u32);
}

fuzz_target!(|data: &[u8]| {
    wisp_fuzz::init_process();
    let mut input = Input::new(data);
    let mem = guest_memory();
    let image = tempfile::NamedTempFile::new_in(wisp_fuzz::scratch_dir()).unwrap();
    std::fs::write(image.path(), vec![0x5a; 16 * 512]).unwrap();
    let block = Arc::new(Mutex::new(Block::new(image.path(), false, None).unwrap()));
    let mut t = MmioTransport::new(mem.clone(), block.clone()).unwrap();
    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        match input.u8() % 10 {
            0 => {
                let offset = u64::from(input.u8()) * 4;
                let value = input.u32();
                write32(&mut t, offset, value);
            }
            1 => {
                let offset = u64::from(input.u8()) * 4;
                read32(&mut t, offset);
            }
            2 => {
                let offset = u64::from(input.u16() % 0x1000);
                let len = [1, 2, 4, 8][usize::from(input.u8() % 4)];
                let bytes = input.bytes(len).to_vec();
                t.write(offset, &bytes);
            }
            3 => {
                let offset = u64::from(input.u16() % 0x1000);
                let mut buf = vec![0u8; [1, 2, 4, 8][usize::from(input.u8() % 4)]];
                t.read(offset, &mut buf);
            }
            4 => block.lock().unwrap().handle_queue_event(),
            5 => {
                // Linux's virtio_add_status: read, OR in one bit, write back.
                let bit = 1u32 << (input.u8() % 8);
                let s = read32(&mut t, STATUS);
                write32(&mut t, STATUS, s | bit);
            }
            6 => {
                // A whole driver feature negotiation, accepting what the device offers
                // masked with the fuzzer's choice.
                let mask = input.u64();
                write32(&mut t, STATUS, 0);
                write32(&mut t, STATUS, ACKNOWLEDGE);
                write32(&mut t, STATUS, ACKNOWLEDGE | DRIVER);
                let mut offered = 0u64;
                for sel in 0..2u32 {
                    write32(&mut t, 0x14, sel);
                    offered |= u64::from(read32(&mut t, 0x10)) << (32 * sel);
                }
                let accepted = offered & mask;
                for sel in 0..2u32 {
                    write32(&mut t, 0x24, sel);
                    write32(&mut t, 0x20, (accepted >> (32 * sel)) as u32);
                }
                write32(&mut t, STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
            }
            7 => {
                // Queue setup: the sane layout of `Ring`, or addresses from the fuzzer.
                let size = u32::from(input.u16());
                let sane = input.u8() & 1 == 0;
                write32(&mut t, QUEUE_SEL, 0);
                write32(&mut t, QUEUE_NUM, size);
                let (desc, avail, used) = if sane {
                    let r = ring(&mem, 0, u16::try_from(size).unwrap_or(1).max(1));
                    r.addresses()
                } else {
                    (input.u64(), input.u64(), input.u64())
                };
                write64(&mut t, QUEUE_DESC_LOW, desc);
                write64(&mut t, QUEUE_AVAIL_LOW, avail);
                write64(&mut t, QUEUE_USED_LOW, used);
                write32(&mut t, QUEUE_READY, 1);
            }
            8 => {
                // Queue contents, laid out as `Ring` lays out a queue of the size given.
                load_ring(&ring(&mem, 0, queue_size(input.u8(), 256)), &mut input);
            }
            _ => {
                let addr = u64::from(input.u32()) % MEM_SIZE as u64;
                let len = usize::from(input.u8());
                let bytes = input.bytes(len);
                let _ = mem.write_slice(bytes, GuestAddress(addr));
            }
        }
        let status = t.device_status();
        let active = block.lock().unwrap().is_activated();
        assert_eq!(active, status & DRIVER_OK != 0 && status & NEEDS_RESET == 0, "status {status:#x}");
        if status & FEATURES_OK != 0 {
            assert_eq!(status & (ACKNOWLEDGE | DRIVER), ACKNOWLEDGE | DRIVER, "status {status:#x}");
        }
        if status & DRIVER_OK != 0 {
            assert_ne!(status & FEATURES_OK, 0, "status {status:#x}");
        }
    }
});
