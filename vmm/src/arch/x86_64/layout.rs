//! Guest physical memory layout of a wisp micro-VM (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT, then IDT (boot only)
//! 0x0000_6000  PVH start_info, module list, memory map
//! 0x0000_7000  zero page (Linux 64-bit boot protocol)
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  identity page tables (PML4, PDPT, PD: first 1 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: MP table (not RAM in the e820 map)
//! 0x0010_0000  RAM for the kernel (ELF segments land where their headers say)
//! ...          initrd, placed at the top of low RAM
//! 0xc000_0000  MMIO gap: virtio-mmio devices from 0xd000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 4 GiB when the VM has more than 3 GiB
//! ```

pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_GDT_MAX_ENTRIES: usize = 4;
pub const BOOT_IDT_START: u64 = 0x520;

pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6100;
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 64;

pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;

pub const CMDLINE_START: u64 = 0x20000;
/// x86 Linux's COMMAND_LINE_SIZE, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;

pub const EBDA_START: u64 = 0x9fc00;
pub const MPTABLE_START: u64 = EBDA_START;
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole; RAM beyond it continues at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// virtio-mmio devices, one 4 KiB register block each.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;

pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// Where KVM puts its TSS and identity map page (Intel only, harmless on AMD).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Legacy IRQs: COM1 on 4; virtio-mmio devices take 5..=23 (IOAPIC pins, also PIC
/// lines below 16).
pub const SERIAL_IRQ: u32 = 4;
pub const IRQ_BASE: u32 = 5;
pub const IRQ_MAX: u32 = 23;
pub const IOAPIC_PINS: u32 = 24;

/// Port I/O of the legacy devices.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const I8042_PORT: u16 = 0x60;
pub const I8042_PORT_LEN: u64 = 0x5;
/// A byte written here by the guest marks a boot milestone (see `devices::legacy::BootMarker`).
pub const BOOT_MARKER_PORT: u16 = 0x505;

/// The RAM regions for a VM of `mem_bytes` bytes (lazily backed: nothing is touched
/// until the guest uses it).
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_bytes - MMIO_GAP_START)]
    }
}

/// The guest's usable RAM as (start, length) pairs: what e820 and the PVH memory map
/// report. The first page up to the EBDA is RAM, the legacy hole up to 1 MiB is not.
pub fn usable_ram(mem_bytes: u64) -> Vec<(u64, u64)> {
    let mut out = vec![(0, EBDA_START)];
    for (start, len) in ram_regions(mem_bytes) {
        let s = start.max(HIMEM_START);
        let e = start + len;
        if e > s {
            out.push((s, e - s));
        }
    }
    out
}

/// The end of RAM below the MMIO gap: the initrd is placed just under it.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_vm_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(usable_ram(128 << 20), vec![(0, EBDA_START), (HIMEM_START, (128 << 20) - HIMEM_START)]);
        assert_eq!(low_ram_end(128 << 20), 128 << 20);
    }

    #[test]
    fn large_vm_skips_the_mmio_gap() {
        let mem = 5u64 << 30;
        assert_eq!(ram_regions(mem), vec![(0, MMIO_GAP_START), (1 << 32, mem - MMIO_GAP_START)]);
        let usable = usable_ram(mem);
        assert_eq!(usable.len(), 3);
        assert_eq!(usable[2], (1 << 32, mem - MMIO_GAP_START));
        assert_eq!(low_ram_end(mem), MMIO_GAP_START);
    }
}
