//! The VM snapshot parser (`wisp_vmm::snapshot::Snapshot::decode`) on any bytes: a
//! snapshot file is read back by later VMMs and may be truncated, corrupted or made by
//! a compromised VMM. Each input is parsed twice: as it is, and with every section's
//! CRC-32 rewritten to match, so that mutations inside a payload reach the field
//! decoders instead of stopping at the checksum. Properties: no panic and no allocation
//! a length field asks for beyond its bound; what parses is canonical (it encodes back
//! to exactly its bytes, so nothing in a file is ignored) and is restorable where its
//! own header describes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wisp_vmm::snapshot::codec::crc32;
use wisp_vmm::snapshot::Snapshot;

/// `data` with the checksum of each section that fits rewritten (the layout of
/// `wisp_vmm::snapshot::format`: a 12-byte prelude, then kind u16, index u16, length
/// u32, payload, crc u32).
fn with_checksums_fixed(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    let mut at = 12;
    while at + 8 <= out.len() {
        let len = u32::from_le_bytes([out[at + 4], out[at + 5], out[at + 6], out[at + 7]]) as usize;
        let Some(end) = (at + 8).checked_add(len) else { break };
        if end + 4 > out.len() {
            break;
        }
        let crc = crc32(&out[at..end]);
        out[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        at = end + 4;
    }
    out
}

fn check(bytes: &[u8]) {
    let Ok(snapshot) = Snapshot::decode(bytes) else { return };
    assert!(!snapshot.vcpus.is_empty());
    assert_eq!(snapshot.encode(), bytes, "a parsed snapshot does not encode back to its bytes");
    snapshot.header.check_restorable(&snapshot.header).unwrap();
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let fixed = with_checksums_fixed(data);
    if fixed != data {
        check(&fixed);
    }
});
