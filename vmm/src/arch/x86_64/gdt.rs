//! The boot GDT and the KVM segment registers derived from it. Linux reloads its own
//! GDT early, so these only have to be valid for the first instructions.

use kvm_bindings::kvm_segment;

/// Builds a GDT descriptor from flags (the 0xF0F0 bits of the high dword), base, limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32) | ((entry & 0x0000_00ff_0000_0000) >> 16) | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    // With the granularity bit the limit counts 4 KiB pages.
    if (entry >> 55) & 1 == 1 {
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

/// The KVM view of descriptor `entry` at GDT index `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from((entry >> 47) & 1 == 0),
    }
}

/// GDT for the 64-bit Linux boot protocol: null, 64-bit code, data, TSS.
pub const GDT_LONG_MODE: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// GDT for the PVH entry (32-bit protected mode, flat): null, 32-bit code, data, TSS.
pub const GDT_PVH: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment() {
        let s = kvm_segment_from_gdt(GDT_LONG_MODE[1], 1);
        assert_eq!((s.selector, s.type_, s.present, s.l, s.db, s.g, s.s), (8, 0xb, 1, 1, 0, 1, 1));
        assert_eq!((s.base, s.limit, s.unusable), (0, 0xffff_ffff, 0));
    }

    #[test]
    fn pvh_segments_are_flat_32_bit() {
        let c = kvm_segment_from_gdt(GDT_PVH[1], 1);
        assert_eq!((c.db, c.l, c.limit, c.type_), (1, 0, 0xffff_ffff, 0xb));
        let t = kvm_segment_from_gdt(GDT_PVH[3], 3);
        assert_eq!((t.limit, t.type_, t.g, t.selector), (0x67, 0xb, 0, 24));
        assert_eq!(kvm_segment_from_gdt(GDT_PVH[0], 0).unusable, 1);
    }

    #[test]
    fn base_round_trips() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0xabcde); // byte granularity
        let s = kvm_segment_from_gdt(e, 2);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
    }
}
