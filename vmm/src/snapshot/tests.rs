//! The snapshot file as a whole: a good file round-trips byte for byte; each kind of
//! damage is refused with the error that names it; a foreign snapshot is refused with
//! a message naming both sides. No KVM needed (tests/tests/snapshot_kvm.rs has the KVM
//! round trip).

use super::codec::{crc32, FieldError};
use super::format::{FormatError, SectionId, Snapshot, FORMAT_VERSION, MAGIC};
use super::header::tests::sample as sample_header;
use super::legacy::LegacyState;
use super::memory::MemoryIdentity;
use super::transport::tests::sample as sample_device;
use super::transport::TransportState;
use super::vcpu::tests::sample as sample_vcpu;
use super::vm::tests::sample as sample_vm;
use super::{Mismatch, SnapshotError, MAX_FILE_BYTES};
use vm_superio::serial::SerialState;

/// A snapshot with `vcpus` vCPUs, two devices (a running vsock-like transport, and an
/// rng the driver never started), a memory file of two regions and a serial console.
fn sample(vcpus: u64) -> Snapshot {
    let devices = vec![sample_device(), TransportState { device_type: 4, ..TransportState::default() }];
    Snapshot {
        header: sample_header(),
        vm: sample_vm(1),
        memory: MemoryIdentity { id: *b"0123456789abcdef", regions: vec![(0, 0xc000_0000), (1 << 32, 0x4000_0000)] },
        vcpus: (0..vcpus).map(|i| sample_vcpu(100 + i)).collect(),
        devices,
        legacy: LegacyState {
            serial: Some(SerialState {
                baud_divisor_low: 1,
                baud_divisor_high: 0,
                interrupt_enable: 2,
                interrupt_identification: 0xc2,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0x5a,
                in_buffer: b"typed".to_vec(),
            }),
        },
    }
}

/// A file's sections as (kind, index, payload), for rearranging.
fn sections(bytes: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = 12;
    while at < bytes.len() {
        let kind = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let index = u16::from_le_bytes([bytes[at + 2], bytes[at + 3]]);
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        out.push((kind, index, bytes[at + 8..at + 8 + len].to_vec()));
        at += 8 + len + 4;
    }
    out
}

/// A file made of `sections`, each with a correct checksum.
fn assemble(sections: &[(u16, u16, Vec<u8>)]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    for (kind, index, payload) in sections {
        let start = out.len();
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&index.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_le_bytes());
    }
    out
}

fn end(vcpus: u16, devices: u16) -> (u16, u16, Vec<u8>) {
    (4, 0, [vcpus.to_le_bytes(), devices.to_le_bytes()].concat())
}

#[test]
fn a_snapshot_round_trips_byte_for_byte() {
    let mut without_devices = sample(2);
    without_devices.devices.clear();
    for s in [sample(1), sample(3), without_devices] {
        let bytes = s.encode();
        let back = Snapshot::decode(&bytes).unwrap();
        assert_eq!(back.header, s.header);
        assert_eq!(back.vm.to_bytes(), s.vm.to_bytes());
        assert_eq!(back.vcpus, s.vcpus);
        assert_eq!(back.devices, s.devices);
        assert_eq!(back.encode(), bytes);
        // The sections a writer makes are the ones the test helpers take apart.
        assert_eq!(assemble(&sections(&bytes)), bytes);
    }
}

#[test]
fn another_magic_is_refused() {
    let mut bytes = sample(1).encode();
    bytes[0] = b'X';
    assert!(matches!(Snapshot::decode(&bytes), Err(FormatError::BadMagic { .. })));
    let e = Snapshot::decode(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0").unwrap_err();
    assert_eq!(
        e.to_string(),
        "not a wisp-vmm snapshot: it starts with [7f, 45, 4c, 46, 02, 01, 01, 00], not \"WISPSNAP\""
    );
    assert!(matches!(Snapshot::decode(b"ELF"), Err(FormatError::BadMagic { .. })));
}

#[test]
fn another_format_version_is_refused() {
    let mut bytes = sample(1).encode();
    // Version 2 had no memory or legacy sections; a file of it is refused, not misread.
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    let e = Snapshot::decode(&bytes).unwrap_err();
    assert_eq!(e, FormatError::Version { found: 2, expected: FORMAT_VERSION });
    assert_eq!(e.to_string(), "snapshot format version 2, this wisp-vmm reads version 3");
}

#[test]
fn a_snapshot_truncated_anywhere_is_refused() {
    let bytes = sample(2).encode();
    for cut in 0..bytes.len() {
        let e = Snapshot::decode(&bytes[..cut]).unwrap_err();
        let ok = matches!(
            e,
            FormatError::Truncated { .. } | FormatError::SectionTruncated { .. } | FormatError::Missing { .. }
        );
        assert!(ok, "cut at {cut}: {e}");
    }
    // At a section boundary: the missing section is named.
    let all = sections(&bytes);
    let without_end = assemble(&all[..all.len() - 1]);
    let e = Snapshot::decode(&without_end).unwrap_err();
    assert_eq!(e.to_string(), format!("the snapshot ends at byte {} without section end", without_end.len()));
    let without_legacy = assemble(&all[..all.len() - 2]);
    let e = Snapshot::decode(&without_legacy).unwrap_err();
    let msg = format!("the snapshot ends at byte {} without section device2 or legacy", without_legacy.len());
    assert_eq!(e.to_string(), msg);
    // Inside a section: which one, and how much is missing.
    let header_len = all[0].2.len();
    let e = Snapshot::decode(&bytes[..12 + 8 + 100]).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("section header truncated: at byte 12 it claims {header_len} bytes and a checksum, 100 bytes are left")
    );
}

#[test]
fn a_flipped_byte_anywhere_is_refused() {
    let bytes = sample(1).encode();
    for at in 0..bytes.len() {
        let mut damaged = bytes.clone();
        damaged[at] ^= 0x01;
        assert!(Snapshot::decode(&damaged).is_err(), "a flipped bit at byte {at} went unnoticed");
    }
    // In a payload: the checksum names the section.
    let all = sections(&bytes);
    let vcpu0_at = 12 + all[..3].iter().map(|s| 8 + s.2.len() + 4).sum::<usize>();
    let mut damaged = bytes.clone();
    damaged[vcpu0_at + 8 + 300] ^= 0x80;
    let e = Snapshot::decode(&damaged).unwrap_err();
    assert!(matches!(e, FormatError::Checksum { section: SectionId { tag: 3, index: 0 }, .. }), "{e}");
    assert!(e.to_string().starts_with(&format!("section vcpu0 at byte {vcpu0_at} is corrupted: its checksum is")));
}

#[test]
fn an_oversized_length_is_refused_before_allocating() {
    let bytes = sample(1).encode();
    let mut damaged = bytes.clone();
    damaged[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
    let e = Snapshot::decode(&damaged).unwrap_err();
    assert_eq!(
        e.to_string(),
        "section header at byte 12 claims 4294967295 bytes, more than the 262144 such a section can have"
    );
    // Within the kind's maximum but past the end of the file.
    damaged[16..20].copy_from_slice(&200_000u32.to_le_bytes());
    assert!(matches!(Snapshot::decode(&damaged), Err(FormatError::SectionTruncated { len: 200_000, .. })));
    // A count inside a payload (with a valid checksum) larger than the payload: the
    // header's guest CPUID entry count.
    let mut all = sections(&bytes);
    let h = sample_header();
    let at =
        2 + h.build.version.len() + 2 + h.build.build_id.len() + 2 + h.host_kernel.len() + 2 + h.cpu.vendor.len() + 12;
    assert_eq!(all[0].2[at..at + 2], 3u16.to_le_bytes());
    all[0].2[at..at + 2].copy_from_slice(&200u16.to_le_bytes());
    let e = Snapshot::decode(&assemble(&all)).unwrap_err();
    assert!(
        matches!(e, FormatError::Content { source: FieldError::Truncated { what: "guest CPUID", need: 5600, .. }, .. }),
        "{e}"
    );
    all[0].2[at..at + 2].copy_from_slice(&60000u16.to_le_bytes());
    let e = Snapshot::decode(&assemble(&all)).unwrap_err();
    assert_eq!(e.to_string(), "section header: guest CPUID has 60000 entries, at most 256 are allowed");
}

#[test]
fn sections_out_of_order_duplicated_or_missing_are_refused() {
    let all = sections(&sample(2).encode());
    assert_eq!(all.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 6, 3, 3, 5, 5, 7, 4]);
    let (header, vm, memory, vcpu0, vcpu1) =
        (all[0].clone(), all[1].clone(), all[2].clone(), all[3].clone(), all[4].clone());
    let (device0, device1, legacy) = (all[5].clone(), all[6].clone(), all[7].clone());
    let end = |vcpus| end(vcpus, 0);
    let err = |s: &[(u16, u16, Vec<u8>)]| Snapshot::decode(&assemble(s)).unwrap_err().to_string();
    let (h, v, m) = (header.clone(), vm.clone(), memory.clone());

    // Order.
    assert!(err(&[vm.clone(), header.clone()]).starts_with("section vm at byte 12 where section header belongs"));
    let msg = err(&[h.clone(), v.clone(), m.clone(), vcpu1.clone(), vcpu0.clone(), legacy.clone(), end(2)]);
    assert!(msg.starts_with("section vcpu1 at byte") && msg.ends_with("where section vcpu0 belongs"), "{msg}");
    let msg = err(&[h.clone(), m.clone(), v.clone()]);
    assert!(msg.starts_with("section memory at byte") && msg.ends_with("where section vm belongs"), "{msg}");
    let msg = err(&[h.clone(), v.clone(), m.clone(), vcpu0.clone(), end(1)]);
    assert!(
        msg.starts_with("section end at byte") && msg.ends_with("where section vcpu1, device0 or legacy belongs"),
        "{msg}"
    );
    // Duplicates.
    let msg = err(&[h.clone(), h.clone(), v.clone(), m.clone(), vcpu0.clone(), legacy.clone(), end(1)]);
    assert!(msg.contains("section header at byte") && msg.ends_with("where section vm belongs"), "{msg}");
    let msg = err(&[h.clone(), v.clone(), m.clone(), m.clone()]);
    assert!(msg.starts_with("section memory at byte") && msg.ends_with("where section vcpu0 belongs"), "{msg}");
    let msg = err(&[h.clone(), v.clone(), m.clone(), vcpu0.clone(), vcpu0.clone(), legacy.clone(), end(2)]);
    assert!(
        msg.starts_with("section vcpu0 at byte") && msg.ends_with("where section vcpu1, device0 or legacy belongs"),
        "{msg}"
    );
    let msg = err(&[h.clone(), v.clone(), m.clone(), vcpu0.clone(), legacy.clone(), legacy.clone(), end(1)]);
    assert!(msg.starts_with("section legacy at byte") && msg.ends_with("where section end belongs"), "{msg}");
    let msg = err(&[h.clone(), v.clone(), m.clone(), vcpu0.clone(), legacy.clone(), end(1), end(1)]);
    assert!(msg.contains("bytes follow the end section"), "{msg}");
    // Missing.
    assert!(err(&[h.clone(), vcpu0.clone(), end(1)]).contains("where section vm belongs"));
    assert!(
        err(&[h.clone(), v.clone(), vcpu0.clone(), legacy.clone(), end(1)]).contains("where section memory belongs")
    );
    assert!(err(&[h.clone(), v.clone(), m.clone(), legacy.clone(), end(0)]).contains("section legacy at byte"));
    let msg = err(&[h.clone(), v.clone(), m.clone(), vcpu0.clone(), legacy.clone(), end(2)]);
    assert_eq!(msg, "the end section says 2 vCPUs, the snapshot has 1");
    assert!(err(&[h.clone(), v.clone(), m.clone()]).ends_with("without section vcpu0"));
    assert!(err(&[h.clone(), v.clone(), m.clone(), vcpu0.clone(), legacy.clone()]).ends_with("without section end"));
    // Devices: after every vCPU, in order, counted by the end section.
    let good = [
        h.clone(),
        v.clone(),
        m.clone(),
        vcpu0.clone(),
        device0.clone(),
        device1.clone(),
        legacy.clone(),
        super::tests::end(1, 2),
    ];
    assert_eq!(Snapshot::decode(&assemble(&good)).unwrap().devices.len(), 2);
    let msg = err(&[h.clone(), v.clone(), m.clone(), device0.clone()]);
    assert!(msg.starts_with("section device0 at byte") && msg.ends_with("where section vcpu0 belongs"), "{msg}");
    let msg = err(&[h.clone(), v.clone(), m.clone(), vcpu0.clone(), device0.clone(), vcpu1.clone()]);
    assert!(
        msg.starts_with("section vcpu1 at byte") && msg.ends_with("where section device1 or legacy belongs"),
        "{msg}"
    );
    let msg = err(&[h.clone(), v.clone(), m.clone(), vcpu0.clone(), device1.clone()]);
    assert!(
        msg.starts_with("section device1 at byte") && msg.ends_with("where section vcpu1, device0 or legacy belongs"),
        "{msg}"
    );
    let msg = err(&[
        h.clone(),
        v.clone(),
        m.clone(),
        vcpu0.clone(),
        device0.clone(),
        legacy.clone(),
        super::tests::end(1, 0),
    ]);
    assert_eq!(msg, "the end section says 0 devices, the snapshot has 1");
    let msg =
        err(&[h.clone(), v.clone(), m.clone(), vcpu0.clone(), legacy.clone(), (4, 0, 1u16.to_le_bytes().to_vec())]);
    assert_eq!(msg, "section end: reading device count needs 2 bytes at offset 2, only 0 left");
    let mut bad_device = device0.clone();
    bad_device.2[36] = 7;
    let msg = err(&[h.clone(), v.clone(), m.clone(), vcpu0.clone(), bad_device]);
    assert_eq!(msg, "section device0: reactivation refused is 7, which is not valid here");
    // Bad content in the memory and legacy sections.
    let mut bad_memory = memory.clone();
    bad_memory.2[16 + 2 + 16] = 1; // the second region's address, off its page
    let msg = err(&[h.clone(), v.clone(), bad_memory]);
    assert_eq!(msg, "section memory: region address (not page-aligned) is 4294967297, which is not valid here");
    let mut long_fifo = legacy.clone();
    long_fifo.2[10..12].copy_from_slice(&65u16.to_le_bytes());
    let msg = err(&[h.clone(), v.clone(), m.clone(), vcpu0.clone(), long_fifo]);
    assert!(msg.starts_with("section legacy: serial receive FIFO has 65 entries, at most 64"), "{msg}");
    // Unknown kinds and stray indexes.
    let msg = err(&[h.clone(), (9, 0, vec![1, 2, 3])]);
    assert!(msg.ends_with("is of a kind this wisp-vmm does not know") && msg.starts_with("section kind 9"), "{msg}");
    let msg = err(&[(1, 5, header.2.clone())]);
    assert!(msg.starts_with("section header#5 at byte 12 where section header belongs"), "{msg}");
    // Bytes left over inside a section.
    let mut long_vm = vm.clone();
    long_vm.2.push(0);
    assert_eq!(err(&[h.clone(), long_vm]), "section vm: 1 bytes follow the last field");
}

#[test]
fn a_foreign_snapshot_is_refused_naming_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let s = sample(1);
    s.save(&path).unwrap();
    assert!(!dir.path().join("vm.snap.tmp").exists());

    let mut here = s.header.clone();
    let loaded = Snapshot::load(&path, &here).unwrap();
    assert_eq!(loaded.encode(), s.encode());

    here.host_kernel = "6.18.44-fc".into();
    let e = Snapshot::load(&path, &here).unwrap_err();
    assert!(matches!(e, SnapshotError::Refused { source: Mismatch::Kernel { .. }, .. }));
    assert_eq!(
        e.to_string(),
        format!(
            "snapshot {} cannot be restored here: snapshot made on kernel 6.12.9-amd64, this host runs 6.18.44-fc",
            path.display()
        )
    );

    let mut here = s.header.clone();
    here.build.build_id = "def456+src.ffff".into();
    let msg = Snapshot::load(&path, &here).unwrap_err().to_string();
    assert!(
        msg.ends_with("snapshot made by wisp-vmm 0.1.0 (abc123+src.0011223344556677), this is 0.1.0 (def456+src.ffff)")
    );

    let mut here = s.header.clone();
    here.cpu.stepping = 2;
    let msg = Snapshot::load(&path, &here).unwrap_err().to_string();
    assert!(msg.contains("CPU model mismatch: snapshot made on GenuineIntel family 0x6 model 0x8f stepping 8, this host has GenuineIntel family 0x6 model 0x8f stepping 2"), "{msg}");

    let mut here = s.header.clone();
    here.config = super::VmIdentity::new([("vcpus", "2"), ("memory_mib", "512"), ("kernel", "sha256:aa")]).unwrap();
    let msg = Snapshot::load(&path, &here).unwrap_err().to_string();
    assert!(msg.ends_with("configuration differs: memory_mib: snapshot 256, this VM 512"), "{msg}");
}

#[test]
fn damaged_and_oversized_files_are_refused_on_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.snap");
    let s = sample(1);
    let mut bytes = s.encode();
    bytes.truncate(bytes.len() - 18); // the end section (16 bytes) and 2 of legacy
    std::fs::write(&path, &bytes).unwrap();
    let msg = Snapshot::load(&path, &s.header).unwrap_err().to_string();
    assert!(msg.starts_with(&format!("snapshot {}: section legacy truncated", path.display())), "{msg}");

    let f = std::fs::File::create(&path).unwrap();
    f.set_len(MAX_FILE_BYTES + 1).unwrap();
    let e = Snapshot::load(&path, &s.header).unwrap_err();
    assert!(matches!(e, SnapshotError::Format { source: FormatError::TooLarge { .. }, .. }), "{e}");

    let e = Snapshot::load(&dir.path().join("missing"), &s.header).unwrap_err();
    assert!(matches!(e, SnapshotError::Read { .. }), "{e}");
}

/// The fuzz target's seeds (fuzz/corpus/seeds.py) write the format independently, in
/// Python: the valid one must parse and re-encode to the same bytes, so the two stay in
/// step.
#[test]
fn the_fuzz_seed_written_by_seeds_py_parses() {
    let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/snapshot");
    let valid = std::fs::read(seeds.join("seed-valid"))
        .expect("fuzz/corpus/snapshot/seed-valid (python3 fuzz/corpus/seeds.py)");
    let s = Snapshot::decode(&valid).unwrap();
    assert_eq!(s.encode(), valid);
    assert_eq!(s.vcpus.len(), 2);
    assert_eq!(s.devices.len(), 2);
    for entry in std::fs::read_dir(&seeds).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("seed-bad-") {
            assert!(Snapshot::decode(&std::fs::read(&path).unwrap()).is_err(), "{name} parsed");
        }
    }
}

#[test]
fn save_does_not_follow_a_symlink_planted_as_its_temporary() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    let path = dir.path().join("vm.snap");
    std::os::unix::fs::symlink(&victim, dir.path().join("vm.snap.tmp")).unwrap();
    sample(1).save(&path).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep", "the save wrote through the symlink");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(!dir.path().join("vm.snap.tmp").exists());
}
