//! A VMM's memory from `/proc/<pid>/smaps`: the PSS of the whole process split into
//! the guest's RAM and everything else (the VMM's own overhead).
//!
//! The guest RAM is the anonymous read-write mapping whose size equals the VM's memory
//! size (QEMU's, which its madvise calls keep apart), or a run of adjacent anonymous
//! mappings adding up to it. wisp-vmm's guest RAM is a plain anonymous mapping, so the
//! kernel merges it with a neighbouring one (a malloc arena placed next to it): then
//! the guest region inside the larger mapping is found by an *anchor*, bytes the VMM
//! wrote at a known guest-physical address (the kernel command line), and its share is
//! counted page by page from `/proc/<pid>/pagemap` (private, unshared pages: PSS = RSS).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{bail, Context};

/// One mapping of `smaps`: its address range, permissions, backing and sizes in KiB.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub inode: u64,
    pub path: String,
    pub size_kib: u64,
    pub rss_kib: u64,
    pub pss_kib: u64,
}

impl Mapping {
    /// Anonymous memory: no file, and not the named heap or stack.
    pub fn is_anonymous(&self) -> bool {
        self.inode == 0 && (self.path.is_empty() || self.path.starts_with("[anon:"))
    }

    fn is_anonymous_rw(&self) -> bool {
        self.is_anonymous() && self.perms.starts_with("rw")
    }

    /// Guest RAM as a VMM maps it: anonymous, or (a VM restored from a snapshot) its
    /// memory file mapped private and writable (copy-on-write).
    fn is_guest_ram_candidate(&self) -> bool {
        self.is_anonymous_rw() || (self.perms == "rw-p" && self.path.ends_with(".mem"))
    }
}

/// Parses the text of `/proc/<pid>/smaps`.
pub fn parse(text: &str) -> anyhow::Result<Vec<Mapping>> {
    let mut maps: Vec<Mapping> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if let Some((lo, hi)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let start = u64::from_str_radix(lo, 16).with_context(|| format!("smaps line {}: {line:?}", n + 1))?;
            let end = u64::from_str_radix(hi, 16).with_context(|| format!("smaps line {}: {line:?}", n + 1))?;
            let perms = words.next().unwrap_or_default().to_string();
            let _offset = words.next();
            let _dev = words.next();
            let inode = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
            let path = words.collect::<Vec<_>>().join(" ");
            maps.push(Mapping { start, end, perms, inode, path, ..Default::default() });
            continue;
        }
        let Some(m) = maps.last_mut() else { bail!("smaps line {}: a field before any mapping: {line:?}", n + 1) };
        let value = || words.clone().next().and_then(|w| w.parse::<u64>().ok()).unwrap_or(0);
        match first {
            "Size:" => m.size_kib = value(),
            "Rss:" => m.rss_kib = value(),
            "Pss:" => m.pss_kib = value(),
            _ => {}
        }
    }
    Ok(maps)
}

/// A VMM process's PSS, split into guest RAM and the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct VmmMemory {
    pub total_pss_kib: u64,
    pub guest_pss_kib: u64,
    /// The overhead by what backs it (binary, library, heap, anonymous), largest first.
    pub overhead_by_backing: Vec<(String, u64)>,
}

impl VmmMemory {
    /// PSS that is not guest RAM: the VMM itself.
    pub fn overhead_kib(&self) -> u64 {
        self.total_pss_kib.saturating_sub(self.guest_pss_kib)
    }
}

/// Splits a process's mappings into guest RAM of `guest_bytes` and the rest.
pub fn split_guest_ram(maps: &[Mapping], guest_bytes: u64) -> anyhow::Result<VmmMemory> {
    let want_kib = guest_bytes / 1024;
    let total_pss_kib = maps.iter().map(|m| m.pss_kib).sum();
    let exact: Vec<&Mapping> = maps.iter().filter(|m| m.is_guest_ram_candidate() && m.size_kib == want_kib).collect();
    let (guest_pss_kib, guest_backing) = match exact.as_slice() {
        [one] => (one.pss_kib, backing(one)),
        [] => {
            let kib = contiguous_anonymous_run(maps, want_kib).with_context(|| {
                format!("no anonymous read-write mapping of {} MiB (the guest RAM) in smaps", guest_bytes >> 20)
            })?;
            (kib, ANONYMOUS.to_string())
        }
        many => bail!(
            "{} anonymous mappings of {} MiB in smaps: cannot tell which is the guest RAM",
            many.len(),
            guest_bytes >> 20
        ),
    };
    Ok(VmmMemory { total_pss_kib, guest_pss_kib, overhead_by_backing: by_backing(maps, guest_pss_kib, &guest_backing) })
}

/// What backs a mapping, as a short label: the file's name, or the kind of memory.
fn backing(m: &Mapping) -> String {
    if m.is_anonymous() {
        return ANONYMOUS.into();
    }
    match m.path.rsplit('/').next() {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => "other".into(),
    }
}

/// What backs anonymous memory, as `backing` labels it.
const ANONYMOUS: &str = "anonymous (malloc arenas, thread stacks)";

/// PSS by backing, with the guest RAM taken out of its backing's (`guest_backing`: the
/// anonymous memory, or a restored VM's memory file).
fn by_backing(maps: &[Mapping], guest_pss_kib: u64, guest_backing: &str) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for m in maps {
        let label = backing(m);
        match out.iter_mut().find(|(l, _)| *l == label) {
            Some((_, kib)) => *kib += m.pss_kib,
            None => out.push((label, m.pss_kib)),
        }
    }
    if let Some((_, kib)) = out.iter_mut().find(|(l, _)| l == guest_backing) {
        *kib = kib.saturating_sub(guest_pss_kib);
    }
    out.retain(|(_, kib)| *kib > 0);
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    out
}

/// The PSS of a maximal run of address-adjacent anonymous read-write mappings whose
/// sizes add up to `want_kib` (a guest region that madvise or THP split up).
fn contiguous_anonymous_run(maps: &[Mapping], want_kib: u64) -> Option<u64> {
    let mut i = 0;
    while i < maps.len() {
        if !maps[i].is_anonymous_rw() {
            i += 1;
            continue;
        }
        let (mut size, mut pss, mut j) = (maps[i].size_kib, maps[i].pss_kib, i + 1);
        while j < maps.len() && maps[j].is_anonymous_rw() && maps[j].start == maps[j - 1].end {
            size += maps[j].size_kib;
            pss += maps[j].pss_kib;
            j += 1;
        }
        if size == want_kib {
            return Some(pss);
        }
        i = j;
    }
    None
}

/// Bytes the VMM put at a known guest-physical address, which tell where the guest
/// RAM starts inside a larger mapping.
#[derive(Debug, Clone, Copy)]
pub struct Anchor<'a> {
    pub gpa: u64,
    pub bytes: &'a [u8],
}

const PAGE: u64 = 4096;

/// Reads and splits the memory of process `pid`.
pub fn vmm_memory(pid: u32, guest_bytes: u64, anchor: Option<Anchor>) -> anyhow::Result<VmmMemory> {
    let proc = Path::new("/proc").join(pid.to_string());
    let path = proc.join("smaps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let maps = parse(&text)?;
    let not_separate = match split_guest_ram(&maps, guest_bytes) {
        Ok(m) => return Ok(m),
        Err(e) => e,
    };
    let Some(anchor) = anchor else { return Err(not_separate.context(format!("process {pid}"))) };
    let base = find_anchored_base(&proc, &maps, guest_bytes, anchor)
        .with_context(|| format!("process {pid}: {not_separate:#}, nor a larger one holding it"))?;
    let guest_pss_kib = resident_kib(&proc, base, guest_bytes)?;
    Ok(VmmMemory {
        total_pss_kib: maps.iter().map(|m| m.pss_kib).sum(),
        guest_pss_kib,
        overhead_by_backing: by_backing(&maps, guest_pss_kib, ANONYMOUS),
    })
}

/// The host address of guest-physical 0 inside an anonymous read-write mapping larger
/// than the guest RAM: the one page-aligned start where the anchor's bytes are found.
/// Only pages that are already backed are read, so looking changes nothing.
fn find_anchored_base(proc: &Path, maps: &[Mapping], guest_bytes: u64, anchor: Anchor) -> anyhow::Result<u64> {
    let mem = File::open(proc.join("mem")).with_context(|| format!("opening {}/mem", proc.display()))?;
    let pages = PageMap::open(proc)?;
    let mut found = Vec::new();
    let mut buf = vec![0u8; anchor.bytes.len()];
    for m in maps.iter().filter(|m| m.is_anonymous_rw() && m.end - m.start > guest_bytes) {
        let entries = pages.entries(m.start, m.end - m.start)?;
        let mut base = m.start;
        while base + guest_bytes <= m.end {
            let at = base + anchor.gpa;
            let backed = |a: u64| entries.get(((a - m.start) / PAGE) as usize).is_some_and(|e| pages.backed(*e));
            if backed(at)
                && backed(at + anchor.bytes.len() as u64 - 1)
                && mem.read_exact_at(&mut buf, at).is_ok()
                && buf == anchor.bytes
            {
                found.push(base);
            }
            base += PAGE;
        }
    }
    match found.as_slice() {
        [one] => Ok(*one),
        [] => bail!(
            "no mapping has the anchor {:?} at guest address {:#x}",
            String::from_utf8_lossy(anchor.bytes),
            anchor.gpa
        ),
        many => bail!("{} places look like the guest RAM (anchor found at {many:x?})", many.len()),
    }
}

/// Resident memory of `[start, start + len)`: its backed pages in `/proc/<pid>/pagemap`.
fn resident_kib(proc: &Path, start: u64, len: u64) -> anyhow::Result<u64> {
    let pages = PageMap::open(proc)?;
    let backed = pages.entries(start, len)?.iter().filter(|e| pages.backed(**e)).count() as u64;
    Ok(backed * PAGE / 1024)
}

/// A process's page table as `/proc/<pid>/pagemap` shows it, with `/proc/kpageflags`
/// (when readable: root) to leave out the shared zero page, which a read of untouched
/// memory maps and which PSS does not count.
struct PageMap {
    pagemap: File,
    kpageflags: Option<File>,
}

const PM_PRESENT: u64 = 1 << 63;
const PM_PFN_MASK: u64 = (1 << 55) - 1;
const KPF_ZERO_PAGE: u64 = 1 << 24;

impl PageMap {
    fn open(proc: &Path) -> anyhow::Result<Self> {
        let pagemap =
            File::open(proc.join("pagemap")).with_context(|| format!("opening {}/pagemap", proc.display()))?;
        Ok(Self { pagemap, kpageflags: File::open("/proc/kpageflags").ok() })
    }

    /// One entry per page of `[start, start + len)`.
    fn entries(&self, start: u64, len: u64) -> anyhow::Result<Vec<u64>> {
        let mut raw = vec![0u8; (len / PAGE * 8) as usize];
        self.pagemap.read_exact_at(&mut raw, start / PAGE * 8).context("reading pagemap")?;
        Ok(raw.chunks_exact(8).map(|e| u64::from_le_bytes(e.try_into().unwrap_or_default())).collect())
    }

    /// Present, and not the zero page.
    fn backed(&self, entry: u64) -> bool {
        if entry & PM_PRESENT == 0 {
            return false;
        }
        let pfn = entry & PM_PFN_MASK;
        let (Some(flags), true) = (&self.kpageflags, pfn != 0) else { return true };
        let mut b = [0u8; 8];
        match flags.read_exact_at(&mut b, pfn * 8) {
            Ok(()) => u64::from_le_bytes(b) & KPF_ZERO_PAGE == 0,
            Err(_) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55ab857b2000-55ab857b8000 r-xp 00002000 00:16 495697                     /usr/bin/qemu-system-x86_64
Size:                 24 kB
Rss:                  24 kB
Pss:                  20 kB
VmFlags: rd ex mr mw me sd
563036dd5000-563037382000 rw-p 00000000 00:00 0                          [heap]
Size:               5812 kB
Rss:                4700 kB
Pss:                4688 kB
7fe26be00000-7fe273e00000 rw-p 00000000 00:00 0 
Size:             131072 kB
Rss:               22528 kB
Pss:               22528 kB
7fe273e00000-7fe273e01000 ---p 00000000 00:00 0 
Size:                  4 kB
Rss:                   0 kB
Pss:                   0 kB
7fe278a99000-7fe279299000 rw-p 00000000 00:00 0 
Size:               8192 kB
Rss:                  12 kB
Pss:                  12 kB
";

    #[test]
    fn parses_mappings_and_their_sizes() {
        let maps = parse(SMAPS).unwrap();
        assert_eq!(maps.len(), 5);
        assert_eq!(maps[0].path, "/usr/bin/qemu-system-x86_64");
        assert_eq!((maps[0].size_kib, maps[0].rss_kib, maps[0].pss_kib), (24, 24, 20));
        assert!(!maps[1].is_anonymous(), "the heap is named, not guest RAM");
        assert!(maps[2].is_anonymous());
        assert_eq!(maps[2].end - maps[2].start, 128 << 20);
    }

    #[test]
    fn guest_ram_is_the_anonymous_mapping_of_the_memory_size() {
        let m = split_guest_ram(&parse(SMAPS).unwrap(), 128 << 20).unwrap();
        assert_eq!((m.total_pss_kib, m.guest_pss_kib), (20 + 4688 + 22528 + 12, 22528));
        assert_eq!(m.overhead_kib(), 20 + 4688 + 12);
        let by: Vec<(&str, u64)> = m.overhead_by_backing.iter().map(|(l, k)| (l.as_str(), *k)).collect();
        assert_eq!(
            by,
            [("[heap]", 4688), ("qemu-system-x86_64", 20), ("anonymous (malloc arenas, thread stacks)", 12)]
        );
        let err = split_guest_ram(&parse(SMAPS).unwrap(), 256 << 20).unwrap_err();
        assert!(format!("{err:#}").contains("256 MiB"), "{err:#}");
    }

    #[test]
    fn a_restored_vm_s_guest_ram_is_its_memory_file_mapped_private() {
        let restored = SMAPS.replace(
            "7fe26be00000-7fe273e00000 rw-p 00000000 00:00 0 ",
            "7fe26be00000-7fe273e00000 rw-p 00000000 00:1a 4242 /run/wisp/templates/0123456789abcdef/vm.mem",
        );
        assert_ne!(restored, SMAPS, "the fixture's guest RAM line moved");
        let m = split_guest_ram(&parse(&restored).unwrap(), 128 << 20).unwrap();
        assert_eq!(m.guest_pss_kib, 22528);
        assert_eq!(m.overhead_kib(), 20 + 4688 + 12);
        assert!(m.overhead_by_backing.iter().all(|(l, _)| l != "vm.mem"), "{:?}", m.overhead_by_backing);
    }

    #[test]
    fn a_merged_guest_region_is_found_by_its_anchor_and_counted_by_page() {
        // This process: an anonymous mapping stands for guest RAM of an unusual size
        // (no other mapping has it) that starts 64 KiB into it; the anchor is written
        // at "guest" 0x2000.
        let (len, off) = ((3 << 20) + (20 << 10), 64 << 10);
        let guest = len as u64;
        // SAFETY: a fresh private anonymous mapping, unmapped below; nothing aliases it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len + off,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the mapping made above. Without huge pages, one written byte is one page.
        unsafe { libc::madvise(p, len + off, libc::MADV_NOHUGEPAGE) };
        let base = p as u64 + off as u64;
        // SAFETY: all writes are inside the mapping made above.
        unsafe {
            std::ptr::copy_nonoverlapping(b"anchor!".as_ptr(), (base + 0x2000) as *mut u8, 7);
            for page in 0..16u64 {
                *((base + 0x10_0000 + page * PAGE) as *mut u8) = 1;
            }
        }
        let anchor = Anchor { gpa: 0x2000, bytes: b"anchor!" };
        let m = vmm_memory(std::process::id(), guest, Some(anchor));
        // SAFETY: unmapping exactly what was mapped above.
        unsafe { libc::munmap(p, len + off) };
        let m = m.unwrap();
        // The anchor's page plus the 16 pages written.
        assert_eq!(m.guest_pss_kib, 17 * 4);
        assert!(vmm_memory(std::process::id(), 3 << 30, Some(anchor)).is_err());
    }

    #[test]
    fn a_split_guest_region_is_found_as_an_adjacent_run() {
        let text = "\
7f0000000000-7f0004000000 rw-p 00000000 00:00 0 
Size:              65536 kB
Pss:                1000 kB
7f0004000000-7f0008000000 rw-p 00000000 00:00 0 
Size:              65536 kB
Pss:                 500 kB
7f0009000000-7f0009001000 rw-p 00000000 00:00 0 
Size:                  4 kB
Pss:                   4 kB
";
        let m = split_guest_ram(&parse(text).unwrap(), 128 << 20).unwrap();
        assert_eq!(m.guest_pss_kib, 1500);
        assert_eq!(m.overhead_kib(), 4);
    }
}
