//! The memory file's trailer parser (`wisp_vmm::snapshot::memory::MemoryIdentity::
//! from_trailer`) on any bytes: a memory file is read back by later VMMs and may be
//! truncated, corrupted or written by a compromised VMM. The input is laid into a
//! trailer page (cut or zero-padded to its size) and parsed twice: as it is, and with
//! its checksum rewritten to match, so mutations reach the field decoders. Properties:
//! no panic and no allocation a count asks for beyond its bound; what parses is
//! canonical (`trailer()` gives back exactly the page) and has sane regions.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wisp_vmm::snapshot::codec::crc32;
use wisp_vmm::snapshot::memory::{MemoryIdentity, TRAILER_BYTES};

/// The trailer's fields before the checksum: magic 8, version 4, id 16, count 2, then
/// 16 bytes per region (`memory.rs`).
fn with_checksum_fixed(page: &[u8]) -> Vec<u8> {
    let mut out = page.to_vec();
    let count = u16::from_le_bytes([out[30], out[31]]) as usize;
    let end = 32 + count * 16;
    if end + 4 <= out.len() {
        let crc = crc32(&out[..end]);
        out[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    }
    out
}

fn check(page: &[u8]) {
    let Ok(identity) = MemoryIdentity::from_trailer(page) else { return };
    assert_eq!(identity.trailer(), page, "a parsed trailer does not encode back to its page");
    let mut last_end = 0u64;
    for (addr, len) in &identity.regions {
        assert!(*len > 0 && addr % 4096 == 0 && len % 4096 == 0);
        assert!(*addr >= last_end, "regions overlap or are out of order");
        last_end = addr.checked_add(*len).expect("a region past the address space");
    }
}

fuzz_target!(|data: &[u8]| {
    // Any length straight through too: only a page-sized one may parse.
    assert!(data.len() == TRAILER_BYTES as usize || MemoryIdentity::from_trailer(data).is_err());
    let mut page = data.to_vec();
    page.resize(TRAILER_BYTES as usize, 0);
    check(&page);
    let fixed = with_checksum_fixed(&page);
    if fixed != page {
        check(&fixed);
    }
});
