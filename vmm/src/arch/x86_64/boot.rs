//! Loading the guest kernel, initrd and command line, and the boot information the
//! kernel reads first: the PVH start_info (preferred, when the ELF has a PVH note) or
//! the zero page of the 64-bit Linux boot protocol (ELF without PVH, or bzImage).
//!
//! The kernel and initrd files come from the operator, not the guest, but they are
//! still checked: an image that is not a kernel, or that does not fit in guest memory,
//! is a clear error.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use super::layout::*;
use super::regs::EntryPoint;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel { path: String, source: std::io::Error },
    #[error("cannot open initrd {path}: {source}")]
    OpenInitrd { path: String, source: std::io::Error },
    #[error("kernel {path} is not a loadable x86_64 vmlinux (ELF) or bzImage: {reason}")]
    BadKernel { path: String, reason: String },
    #[error("initrd {path} ({size} bytes) does not fit in guest memory between the kernel end {kernel_end:#x} and {limit:#x}; give the VM more memory")]
    InitrdTooBig { path: String, size: u64, kernel_end: u64, limit: u64 },
    #[error("reading initrd {path}: {reason}")]
    ReadInitrd { path: String, reason: String },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("writing boot information into guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Everything the boot vCPU needs to start the kernel.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    pub entry: EntryPoint,
}

#[derive(Copy, Clone, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);
// SAFETY: boot_params is a plain-old-data C struct (integers and arrays only).
unsafe impl ByteValued for ZeroPage {}

#[derive(Copy, Clone, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: plain-old-data C struct.
unsafe impl ByteValued for StartInfo {}

#[derive(Copy, Clone, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: plain-old-data C struct.
unsafe impl ByteValued for ModlistEntry {}

#[derive(Copy, Clone, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: plain-old-data C struct.
unsafe impl ByteValued for MemmapEntry {}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 4096;

enum KernelFormat {
    Elf { entry: u64, pvh: Option<u64> },
    BzImage { entry: u64, header: linux_loader::loader::bootparam::setup_header },
}

/// Checks, before any VM exists, that the kernel is a vmlinux (ELF) or a bzImage
/// ("HdrS" at 0x202) and that the initrd can be opened: a wrong path or file is
/// reported by name instead of as a failure deep in the boot.
pub fn check_images(kernel: &Path, initrd: Option<&Path>) -> Result<(), BootError> {
    let kpath = kernel.display().to_string();
    let mut f = File::open(kernel).map_err(|source| BootError::OpenKernel { path: kpath.clone(), source })?;
    let mut head = [0u8; 0x206];
    let n = read_up_to(&mut f, &mut head).map_err(|source| BootError::OpenKernel { path: kpath.clone(), source })?;
    let elf = n >= 4 && &head[..4] == b"\x7fELF";
    let bzimage = n >= 0x206 && &head[0x202..0x206] == b"HdrS";
    if !elf && !bzimage {
        return Err(BootError::BadKernel { path: kpath, reason: "neither an ELF vmlinux nor a bzImage".into() });
    }
    if let Some(p) = initrd {
        File::open(p).map_err(|source| BootError::OpenInitrd { path: p.display().to_string(), source })?;
    }
    Ok(())
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Loads the kernel, the initrd (if any) and the command line into `mem` and writes
/// the boot information for the protocol the kernel supports.
pub fn load_guest(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &Cmdline,
) -> Result<BootInfo, BootError> {
    let kpath = kernel.display().to_string();
    let mut kfile = File::open(kernel).map_err(|source| BootError::OpenKernel { path: kpath.clone(), source })?;
    let mut magic = [0u8; 4];
    kfile
        .read_exact(&mut magic)
        .map_err(|e| BootError::BadKernel { path: kpath.clone(), reason: format!("cannot read its header: {e}") })?;

    let (format, kernel_end) = if &magic == b"\x7fELF" {
        let r = Elf::load(mem, None, &mut kfile, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| BootError::BadKernel { path: kpath.clone(), reason: e.to_string() })?;
        let pvh = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => Some(a.raw_value()),
            _ => None,
        };
        (KernelFormat::Elf { entry: r.kernel_load.raw_value(), pvh }, r.kernel_end)
    } else {
        let r = BzImage::load(mem, None, &mut kfile, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| BootError::BadKernel { path: kpath.clone(), reason: e.to_string() })?;
        let header = r
            .setup_header
            .ok_or_else(|| BootError::BadKernel { path: kpath.clone(), reason: "no setup header".into() })?;
        (KernelFormat::BzImage { entry: r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET, header }, r.kernel_end)
    };

    let initrd = match initrd {
        Some(p) => Some(load_initrd(mem, mem_bytes, p, kernel_end)?),
        None => None,
    };

    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline.as_cstring().map_err(|e| BootError::Cmdline(e.to_string()))?.as_bytes().len();

    let entry = match format {
        KernelFormat::Elf { pvh: Some(pvh_entry), .. } => {
            write_start_info(mem, mem_bytes, initrd)?;
            EntryPoint::Pvh { entry: pvh_entry, start_info: PVH_INFO_START }
        }
        KernelFormat::Elf { entry, pvh: None } => {
            write_zero_page(mem, mem_bytes, None, cmdline_len, initrd)?;
            EntryPoint::Linux64 { entry, zero_page: ZERO_PAGE_START }
        }
        KernelFormat::BzImage { entry, header } => {
            write_zero_page(mem, mem_bytes, Some(header), cmdline_len, initrd)?;
            EntryPoint::Linux64 { entry, zero_page: ZERO_PAGE_START }
        }
    };
    Ok(BootInfo { entry })
}

/// Places the initrd at the top of low RAM (page aligned), above the kernel.
fn load_initrd(mem: &GuestMemoryMmap, mem_bytes: u64, path: &Path, kernel_end: u64) -> Result<(u64, u64), BootError> {
    let ipath = path.display().to_string();
    let mut f = File::open(path).map_err(|source| BootError::OpenInitrd { path: ipath.clone(), source })?;
    let size = f.metadata().map_err(|source| BootError::OpenInitrd { path: ipath.clone(), source })?.len();
    let limit = low_ram_end(mem_bytes);
    let addr = limit.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
    let addr = match addr {
        Some(a) if a >= kernel_end && size > 0 => a,
        _ => return Err(BootError::InitrdTooBig { path: ipath, size, kernel_end, limit }),
    };
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooBig { path: ipath.clone(), size, kernel_end, limit })?;
    read_into_guest(mem, GuestAddress(addr), &mut f, len)
        .map_err(|reason| BootError::ReadInitrd { path: ipath, reason })?;
    Ok((addr, size))
}

fn read_into_guest<F: ReadVolatile>(mem: &GuestMemoryMmap, addr: GuestAddress, src: &mut F, len: usize) -> Result<(), String> {
    mem.read_exact_volatile_from(addr, src, len).map_err(|e| e.to_string())
}

fn write_start_info(mem: &GuestMemoryMmap, mem_bytes: u64, initrd: Option<(u64, u64)>) -> Result<(), BootError> {
    let ram = usable_ram(mem_bytes);
    for (i, (addr, size)) in ram.iter().take(PVH_MEMMAP_MAX_ENTRIES).enumerate() {
        let e = MemmapEntry(hvm_memmap_table_entry { addr: *addr, size: *size, type_: E820_RAM, reserved: 0 });
        mem.write_obj(e, GuestAddress(PVH_MEMMAP_START + (i * std::mem::size_of::<MemmapEntry>()) as u64))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: ram.len().min(PVH_MEMMAP_MAX_ENTRIES) as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        mem.write_obj(ModlistEntry(hvm_modlist_entry { paddr: addr, size, ..Default::default() }), GuestAddress(PVH_MODLIST_START))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(StartInfo(info), GuestAddress(PVH_INFO_START))?;
    Ok(())
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let ram = usable_ram(mem_bytes);
    let n = ram.len().min(params.e820_table.len());
    for (slot, (addr, size)) in params.e820_table.iter_mut().zip(ram.iter()) {
        *slot = boot_e820_entry { addr: *addr, size: *size, type_: E820_RAM };
    }
    params.e820_entries = n as u8;
    mem.write_obj(ZeroPage(params), GuestAddress(ZERO_PAGE_START))?;
    Ok(())
}

/// The part of the kernel command line the VMM itself owns, before devices and the
/// user's own arguments are added.
pub fn base_cmdline(console: bool) -> Result<Cmdline, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    // Only parameters this kernel knows: unknown ones are handed to init as arguments.
    let base = if console { "console=ttyS0 reboot=k panic=-1" } else { "8250.nr_uarts=0 quiet reboot=k panic=-1" };
    c.insert_str(base).map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(size: u64) -> GuestMemoryMmap {
        let regions: Vec<_> = ram_regions(size).into_iter().map(|(a, l)| (GuestAddress(a), l as usize)).collect();
        GuestMemoryMmap::from_ranges(&regions).unwrap()
    }

    #[test]
    fn rejects_a_file_that_is_not_a_kernel() {
        let m = mem(64 << 20);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 8192]).unwrap();
        let c = base_cmdline(false).unwrap();
        let err = load_guest(&m, 64 << 20, f.path(), None, &c).unwrap_err();
        assert!(matches!(err, BootError::BadKernel { .. }), "{err}");
        let err = load_guest(&m, 64 << 20, Path::new("/nonexistent/vmlinux"), None, &c).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn initrd_goes_high_and_too_big_is_refused() {
        let size = 64u64 << 20;
        let m = mem(size);
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&vec![0x5a; 10_000]).unwrap();
        let (addr, len) = load_initrd(&m, size, f.path(), 0x200_0000).unwrap();
        assert_eq!(len, 10_000);
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + len <= size && addr + len + PAGE_SIZE > size);
        let err = load_initrd(&m, size, f.path(), size - 4096).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooBig { .. }));
    }

    #[test]
    fn start_info_and_zero_page_describe_ram() {
        let size = 128u64 << 20;
        let m = mem(size);
        write_start_info(&m, size, Some((0x700_0000, 0x1000))).unwrap();
        let info: StartInfo = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.0.magic, XEN_HVM_START_MAGIC);
        assert_eq!({ info.0.memmap_entries }, 2);
        assert_eq!({ info.0.nr_modules }, 1);
        let e: MemmapEntry = m.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!((e.0.addr, e.0.size), (HIMEM_START, size - HIMEM_START));

        write_zero_page(&m, size, None, 10, Some((0x700_0000, 0x1000))).unwrap();
        let zp: ZeroPage = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ zp.0.e820_entries }, 2);
        assert_eq!({ zp.0.hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ zp.0.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
    }
}
