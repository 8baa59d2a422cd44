//! The KVM state structs (kvm-bindings' copies of the kernel's C structs), encoded
//! field by field in a layout this module defines, never as raw memory: the file does
//! not depend on Rust's or the kernel's struct layout, padding is neither written nor
//! read, and every struct is built with all its fields named, so a kvm-bindings release
//! that adds a field fails to compile here instead of losing it silently. The layout of
//! each struct is the order of the fields below, integers little-endian; a change to it
//! needs a new `format::FORMAT_VERSION`.
//!
//! Trust: decoding reads a payload whose checksum matched but whose contents may still
//! be hand-made; every count is bounded and every field bounds-checked (`codec`). What
//! the values mean is KVM's to judge when they are set.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_fpu, kvm_irqchip, kvm_irqchip__bindgen_ty_1,
    kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_channel_state, kvm_pit_state2, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_vcpu_events__bindgen_ty_1, kvm_vcpu_events__bindgen_ty_2,
    kvm_vcpu_events__bindgen_ty_3, kvm_vcpu_events__bindgen_ty_4, kvm_vcpu_events__bindgen_ty_5, kvm_xcr, kvm_xcrs,
};

use super::codec::{FieldError, Reader, Writer};

/// The most CPUID entries a list may hold (kvm-bindings' `KVM_MAX_CPUID_ENTRIES`).
pub const MAX_CPUID_ENTRIES: usize = kvm_bindings::KVM_MAX_CPUID_ENTRIES;
/// The most MSRs one vCPU's state may hold (kvm-bindings' `KVM_MAX_MSR_ENTRIES`).
pub const MAX_MSRS: usize = kvm_bindings::KVM_MAX_MSR_ENTRIES;
/// The legacy XSAVE area KVM_GET_XSAVE returns: 1024 u32 words.
pub const XSAVE_WORDS: usize = 1024;
/// The LAPIC register page KVM_GET_LAPIC returns.
pub const LAPIC_BYTES: usize = 1024;
/// The union of PIC and IOAPIC state in `kvm_irqchip`.
pub const IRQCHIP_BYTES: usize = 512;

const CPUID_ENTRY_BYTES: usize = 7 * 4;
const MSR_ENTRY_BYTES: usize = 4 + 8;

pub fn put_regs(w: &mut Writer, r: &kvm_regs) {
    for v in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
        r.rip, r.rflags,
    ] {
        w.u64(v);
    }
}

pub fn get_regs(r: &mut Reader) -> Result<kvm_regs, FieldError> {
    let mut g = || r.u64("regs");
    Ok(kvm_regs {
        rax: g()?,
        rbx: g()?,
        rcx: g()?,
        rdx: g()?,
        rsi: g()?,
        rdi: g()?,
        rsp: g()?,
        rbp: g()?,
        r8: g()?,
        r9: g()?,
        r10: g()?,
        r11: g()?,
        r12: g()?,
        r13: g()?,
        r14: g()?,
        r15: g()?,
        rip: g()?,
        rflags: g()?,
    })
}

fn put_segment(w: &mut Writer, s: &kvm_segment) {
    w.u64(s.base);
    w.u32(s.limit);
    w.u16(s.selector);
    for b in [s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable] {
        w.u8(b);
    }
}

fn get_segment(r: &mut Reader) -> Result<kvm_segment, FieldError> {
    const W: &str = "sregs segment";
    Ok(kvm_segment {
        base: r.u64(W)?,
        limit: r.u32(W)?,
        selector: r.u16(W)?,
        type_: r.u8(W)?,
        present: r.u8(W)?,
        dpl: r.u8(W)?,
        db: r.u8(W)?,
        s: r.u8(W)?,
        l: r.u8(W)?,
        g: r.u8(W)?,
        avl: r.u8(W)?,
        unusable: r.u8(W)?,
        padding: 0,
    })
}

fn put_dtable(w: &mut Writer, t: &kvm_dtable) {
    w.u64(t.base);
    w.u16(t.limit);
}

fn get_dtable(r: &mut Reader) -> Result<kvm_dtable, FieldError> {
    Ok(kvm_dtable { base: r.u64("sregs table")?, limit: r.u16("sregs table")?, padding: [0; 3] })
}

pub fn put_sregs(w: &mut Writer, s: &kvm_sregs) {
    for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
        put_segment(w, seg);
    }
    put_dtable(w, &s.gdt);
    put_dtable(w, &s.idt);
    for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
        w.u64(v);
    }
    for v in s.interrupt_bitmap {
        w.u64(v);
    }
}

pub fn get_sregs(r: &mut Reader) -> Result<kvm_sregs, FieldError> {
    const W: &str = "sregs";
    Ok(kvm_sregs {
        cs: get_segment(r)?,
        ds: get_segment(r)?,
        es: get_segment(r)?,
        fs: get_segment(r)?,
        gs: get_segment(r)?,
        ss: get_segment(r)?,
        tr: get_segment(r)?,
        ldt: get_segment(r)?,
        gdt: get_dtable(r)?,
        idt: get_dtable(r)?,
        cr0: r.u64(W)?,
        cr2: r.u64(W)?,
        cr3: r.u64(W)?,
        cr4: r.u64(W)?,
        cr8: r.u64(W)?,
        efer: r.u64(W)?,
        apic_base: r.u64(W)?,
        interrupt_bitmap: [r.u64(W)?, r.u64(W)?, r.u64(W)?, r.u64(W)?],
    })
}

pub fn put_fpu(w: &mut Writer, f: &kvm_fpu) {
    for reg in &f.fpr {
        w.bytes(reg);
    }
    w.u16(f.fcw);
    w.u16(f.fsw);
    w.u8(f.ftwx);
    w.u16(f.last_opcode);
    w.u64(f.last_ip);
    w.u64(f.last_dp);
    for reg in &f.xmm {
        w.bytes(reg);
    }
    w.u32(f.mxcsr);
}

pub fn get_fpu(r: &mut Reader) -> Result<kvm_fpu, FieldError> {
    const W: &str = "fpu";
    let mut fpr = [[0u8; 16]; 8];
    for reg in &mut fpr {
        r.fill(reg, W)?;
    }
    let (fcw, fsw, ftwx, last_opcode, last_ip, last_dp) =
        (r.u16(W)?, r.u16(W)?, r.u8(W)?, r.u16(W)?, r.u64(W)?, r.u64(W)?);
    let mut xmm = [[0u8; 16]; 16];
    for reg in &mut xmm {
        r.fill(reg, W)?;
    }
    Ok(kvm_fpu { fpr, fcw, fsw, ftwx, pad1: 0, last_opcode, last_ip, last_dp, xmm, mxcsr: r.u32(W)?, pad2: 0 })
}

/// The legacy XSAVE area (KVM_GET_XSAVE), 1024 words.
pub fn put_xsave(w: &mut Writer, region: &[u32; XSAVE_WORDS]) {
    for v in region {
        w.u32(*v);
    }
}

pub fn get_xsave(r: &mut Reader) -> Result<Box<[u32; XSAVE_WORDS]>, FieldError> {
    let bytes = r.take(XSAVE_WORDS * 4, "xsave")?;
    let mut region = Box::new([0u32; XSAVE_WORDS]);
    for (word, b) in region.iter_mut().zip(bytes.chunks_exact(4)) {
        *word = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(region)
}

pub fn put_xcrs(w: &mut Writer, x: &kvm_xcrs) {
    w.u32(x.nr_xcrs);
    w.u32(x.flags);
    for xcr in &x.xcrs {
        w.u32(xcr.xcr);
        w.u64(xcr.value);
    }
}

pub fn get_xcrs(r: &mut Reader) -> Result<kvm_xcrs, FieldError> {
    const W: &str = "xcrs";
    let nr_xcrs = r.u32(W)?;
    if nr_xcrs > 16 {
        return Err(FieldError::Invalid { what: "xcrs count", value: u64::from(nr_xcrs) });
    }
    let flags = r.u32(W)?;
    let mut xcrs = [kvm_xcr::default(); 16];
    for xcr in &mut xcrs {
        *xcr = kvm_xcr { xcr: r.u32(W)?, reserved: 0, value: r.u64(W)? };
    }
    Ok(kvm_xcrs { nr_xcrs, flags, xcrs, padding: [0; 16] })
}

pub fn put_msrs(w: &mut Writer, msrs: &[kvm_msr_entry]) {
    w.count(msrs.len());
    for m in msrs {
        w.u32(m.index);
        w.u64(m.data);
    }
}

pub fn get_msrs(r: &mut Reader) -> Result<Vec<kvm_msr_entry>, FieldError> {
    let n = r.count(MAX_MSRS, MSR_ENTRY_BYTES, "msrs")?;
    (0..n).map(|_| Ok(kvm_msr_entry { index: r.u32("msrs")?, reserved: 0, data: r.u64("msrs")? })).collect()
}

pub fn put_lapic(w: &mut Writer, l: &kvm_lapic_state) {
    for b in l.regs {
        w.u8(b as u8);
    }
}

pub fn get_lapic(r: &mut Reader) -> Result<kvm_lapic_state, FieldError> {
    let bytes = r.take(LAPIC_BYTES, "lapic")?;
    let mut regs = [0; LAPIC_BYTES];
    for (out, b) in regs.iter_mut().zip(bytes) {
        *out = *b as _;
    }
    Ok(kvm_lapic_state { regs })
}

pub fn put_events(w: &mut Writer, e: &kvm_vcpu_events) {
    let x = &e.exception;
    for b in [x.injected, x.nr, x.has_error_code, x.pending] {
        w.u8(b);
    }
    w.u32(x.error_code);
    let i = &e.interrupt;
    for b in [i.injected, i.nr, i.soft, i.shadow] {
        w.u8(b);
    }
    let n = &e.nmi;
    for b in [n.injected, n.pending, n.masked] {
        w.u8(b);
    }
    w.u32(e.sipi_vector);
    w.u32(e.flags);
    let s = &e.smi;
    for b in [s.smm, s.pending, s.smm_inside_nmi, s.latched_init] {
        w.u8(b);
    }
    w.u8(e.triple_fault.pending);
    w.u8(e.exception_has_payload);
    w.u64(e.exception_payload);
}

pub fn get_events(r: &mut Reader) -> Result<kvm_vcpu_events, FieldError> {
    const W: &str = "vcpu events";
    Ok(kvm_vcpu_events {
        exception: kvm_vcpu_events__bindgen_ty_1 {
            injected: r.u8(W)?,
            nr: r.u8(W)?,
            has_error_code: r.u8(W)?,
            pending: r.u8(W)?,
            error_code: r.u32(W)?,
        },
        interrupt: kvm_vcpu_events__bindgen_ty_2 { injected: r.u8(W)?, nr: r.u8(W)?, soft: r.u8(W)?, shadow: r.u8(W)? },
        nmi: kvm_vcpu_events__bindgen_ty_3 { injected: r.u8(W)?, pending: r.u8(W)?, masked: r.u8(W)?, pad: 0 },
        sipi_vector: r.u32(W)?,
        flags: r.u32(W)?,
        smi: kvm_vcpu_events__bindgen_ty_4 {
            smm: r.u8(W)?,
            pending: r.u8(W)?,
            smm_inside_nmi: r.u8(W)?,
            latched_init: r.u8(W)?,
        },
        triple_fault: kvm_vcpu_events__bindgen_ty_5 { pending: r.u8(W)? },
        reserved: [0; 26],
        exception_has_payload: r.u8(W)?,
        exception_payload: r.u64(W)?,
    })
}

pub fn put_debugregs(w: &mut Writer, d: &kvm_debugregs) {
    for v in d.db {
        w.u64(v);
    }
    w.u64(d.dr6);
    w.u64(d.dr7);
    w.u64(d.flags);
}

pub fn get_debugregs(r: &mut Reader) -> Result<kvm_debugregs, FieldError> {
    const W: &str = "debug registers";
    Ok(kvm_debugregs {
        db: [r.u64(W)?, r.u64(W)?, r.u64(W)?, r.u64(W)?],
        dr6: r.u64(W)?,
        dr7: r.u64(W)?,
        flags: r.u64(W)?,
        reserved: [0; 9],
    })
}

pub fn put_mp_state(w: &mut Writer, m: &kvm_mp_state) {
    w.u32(m.mp_state);
}

pub fn get_mp_state(r: &mut Reader) -> Result<kvm_mp_state, FieldError> {
    Ok(kvm_mp_state { mp_state: r.u32("mp state")? })
}

pub fn put_cpuid(w: &mut Writer, entries: &[kvm_cpuid_entry2]) {
    w.count(entries.len());
    for e in entries {
        for v in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
            w.u32(v);
        }
    }
}

pub fn get_cpuid(r: &mut Reader, what: &'static str) -> Result<Vec<kvm_cpuid_entry2>, FieldError> {
    let n = r.count(MAX_CPUID_ENTRIES, CPUID_ENTRY_BYTES, what)?;
    (0..n)
        .map(|_| {
            Ok(kvm_cpuid_entry2 {
                function: r.u32(what)?,
                index: r.u32(what)?,
                flags: r.u32(what)?,
                eax: r.u32(what)?,
                ebx: r.u32(what)?,
                ecx: r.u32(what)?,
                edx: r.u32(what)?,
                padding: [0; 3],
            })
        })
        .collect()
}

/// One in-kernel interrupt controller: its id, then the whole 512-byte union as KVM
/// fills it (a `kvm_pic_state` or a `kvm_ioapic_state` at its start, zeros after).
pub fn put_irqchip(w: &mut Writer, c: &kvm_irqchip) {
    w.u32(c.chip_id);
    // SAFETY: `dummy` spans the whole union and every byte pattern is a valid c_char;
    // the union is zeroed when created (kvm-bindings' Default) and KVM fills it.
    let bytes = unsafe { c.chip.dummy };
    for b in bytes {
        w.u8(b as u8);
    }
}

pub fn get_irqchip(r: &mut Reader) -> Result<kvm_irqchip, FieldError> {
    let chip_id = r.u32("irqchip id")?;
    let bytes = r.take(IRQCHIP_BYTES, "irqchip")?;
    let mut dummy = [0; IRQCHIP_BYTES];
    for (out, b) in dummy.iter_mut().zip(bytes) {
        *out = *b as _;
    }
    Ok(kvm_irqchip { chip_id, pad: 0, chip: kvm_irqchip__bindgen_ty_1 { dummy } })
}

pub fn put_pit(w: &mut Writer, p: &kvm_pit_state2) {
    for c in &p.channels {
        w.u32(c.count);
        w.u16(c.latched_count);
        for b in [
            c.count_latched,
            c.status_latched,
            c.status,
            c.read_state,
            c.write_state,
            c.write_latch,
            c.rw_mode,
            c.mode,
            c.bcd,
            c.gate,
        ] {
            w.u8(b);
        }
        w.i64(c.count_load_time);
    }
    w.u32(p.flags);
}

fn get_pit_channel(r: &mut Reader) -> Result<kvm_pit_channel_state, FieldError> {
    const W: &str = "pit channel";
    Ok(kvm_pit_channel_state {
        count: r.u32(W)?,
        latched_count: r.u16(W)?,
        count_latched: r.u8(W)?,
        status_latched: r.u8(W)?,
        status: r.u8(W)?,
        read_state: r.u8(W)?,
        write_state: r.u8(W)?,
        write_latch: r.u8(W)?,
        rw_mode: r.u8(W)?,
        mode: r.u8(W)?,
        bcd: r.u8(W)?,
        gate: r.u8(W)?,
        count_load_time: r.i64(W)?,
    })
}

pub fn get_pit(r: &mut Reader) -> Result<kvm_pit_state2, FieldError> {
    Ok(kvm_pit_state2 {
        channels: [get_pit_channel(r)?, get_pit_channel(r)?, get_pit_channel(r)?],
        flags: r.u32("pit")?,
        reserved: [0; 9],
    })
}

pub fn put_clock(w: &mut Writer, c: &kvm_clock_data) {
    w.u64(c.clock);
    w.u32(c.flags);
    w.u64(c.realtime);
    w.u64(c.host_tsc);
}

pub fn get_clock(r: &mut Reader) -> Result<kvm_clock_data, FieldError> {
    const W: &str = "kvm clock";
    Ok(kvm_clock_data {
        clock: r.u64(W)?,
        flags: r.u32(W)?,
        pad0: 0,
        realtime: r.u64(W)?,
        host_tsc: r.u64(W)?,
        pad: [0; 4],
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small deterministic generator for test values.
    pub struct Rand(u64);

    impl Rand {
        pub fn new(seed: u64) -> Self {
            Self(seed | 1)
        }

        pub fn next(&mut self) -> u64 {
            // xorshift64*
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        pub fn fill(&mut self, out: &mut [u8]) {
            for b in out {
                *b = self.next() as u8;
            }
        }
    }

    /// A `T` with every byte random. Test-only: `T` must be a kvm-bindings struct of
    /// plain integers (every bit pattern valid).
    pub fn random<T: Copy>(rand: &mut Rand) -> T {
        let mut bytes = vec![0u8; std::mem::size_of::<T>()];
        rand.fill(&mut bytes);
        // SAFETY: the callers pass integer-only C structs; `bytes` has their size and
        // read_unaligned copes with the Vec's alignment.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
    }

    fn encoded(put: impl FnOnce(&mut Writer)) -> Vec<u8> {
        let mut w = Writer::new();
        put(&mut w);
        w.into_bytes()
    }

    /// Encodes `value`, decodes it, checks the decoder read every byte and returns it.
    fn round_trip<T>(value: &T, put: fn(&mut Writer, &T), get: fn(&mut Reader) -> Result<T, FieldError>) -> T {
        let bytes = encoded(|w| put(w, value));
        let mut r = Reader::new(&bytes);
        let back = get(&mut r).unwrap();
        r.finish().unwrap();
        // Byte for byte: what was decoded encodes to the same bytes.
        assert_eq!(encoded(|w| put(w, &back)), bytes);
        back
    }

    // Each struct with random values in every field but the padding this module does
    // not store: a field the encoding forgot comes back different.
    /// Random special registers, with the padding (which the encoding does not store) zero.
    pub fn random_sregs(rand: &mut Rand) -> kvm_sregs {
        let mut sregs: kvm_sregs = random(rand);
        for s in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.fs, &mut sregs.gs, &mut sregs.ss] {
            s.padding = 0;
        }
        sregs.tr.padding = 0;
        sregs.ldt.padding = 0;
        sregs.gdt.padding = [0; 3];
        sregs.idt.padding = [0; 3];
        sregs
    }

    #[test]
    fn every_field_of_every_struct_round_trips() {
        let mut rand = Rand::new(0x5eed);
        for _ in 0..50 {
            let regs: kvm_regs = random(&mut rand);
            assert_eq!(round_trip(&regs, put_regs, get_regs), regs);

            let sregs = random_sregs(&mut rand);
            assert_eq!(round_trip(&sregs, put_sregs, get_sregs), sregs);

            let mut fpu: kvm_fpu = random(&mut rand);
            fpu.pad1 = 0;
            fpu.pad2 = 0;
            assert_eq!(round_trip(&fpu, put_fpu, get_fpu), fpu);

            let mut xsave = Box::new([0u32; XSAVE_WORDS]);
            xsave.iter_mut().for_each(|w| *w = rand.next() as u32);
            assert_eq!(round_trip(&*xsave, put_xsave, |r| get_xsave(r).map(|b| *b)), *xsave);

            let mut xcrs: kvm_xcrs = random(&mut rand);
            xcrs.nr_xcrs %= 17;
            xcrs.padding = [0; 16];
            xcrs.xcrs.iter_mut().for_each(|x| x.reserved = 0);
            assert_eq!(round_trip(&xcrs, put_xcrs, get_xcrs), xcrs);

            let msrs: Vec<kvm_msr_entry> = (0..rand.next() % 40)
                .map(|_| kvm_msr_entry { index: rand.next() as u32, reserved: 0, data: rand.next() })
                .collect();
            let put_v = |w: &mut Writer, m: &Vec<kvm_msr_entry>| put_msrs(w, m);
            assert_eq!(round_trip(&msrs, put_v, get_msrs), msrs);

            let lapic: kvm_lapic_state = random(&mut rand);
            assert_eq!(round_trip(&lapic, put_lapic, get_lapic), lapic);

            let mut events: kvm_vcpu_events = random(&mut rand);
            events.nmi.pad = 0;
            events.reserved = [0; 26];
            assert_eq!(round_trip(&events, put_events, get_events), events);

            let mut dbg: kvm_debugregs = random(&mut rand);
            dbg.reserved = [0; 9];
            assert_eq!(round_trip(&dbg, put_debugregs, get_debugregs), dbg);

            let mp: kvm_mp_state = random(&mut rand);
            assert_eq!(round_trip(&mp, put_mp_state, get_mp_state), mp);

            let cpuid: Vec<kvm_cpuid_entry2> =
                (0..rand.next() % 40).map(|_| kvm_cpuid_entry2 { padding: [0; 3], ..random(&mut rand) }).collect();
            let put_c = |w: &mut Writer, c: &Vec<kvm_cpuid_entry2>| put_cpuid(w, c);
            assert_eq!(round_trip(&cpuid, put_c, |r| get_cpuid(r, "cpuid")), cpuid);

            let mut chip: kvm_irqchip = random(&mut rand);
            chip.pad = 0;
            let back = round_trip(&chip, put_irqchip, get_irqchip);
            // SAFETY: reading the byte view of both unions (see put_irqchip).
            assert!(back.chip_id == chip.chip_id && unsafe { back.chip.dummy == chip.chip.dummy });

            let mut pit: kvm_pit_state2 = random(&mut rand);
            pit.reserved = [0; 9];
            assert_eq!(round_trip(&pit, put_pit, get_pit), pit);

            let mut clock: kvm_clock_data = random(&mut rand);
            clock.pad0 = 0;
            clock.pad = [0; 4];
            assert_eq!(round_trip(&clock, put_clock, get_clock), clock);
        }
    }

    #[test]
    fn out_of_range_counts_are_refused() {
        let mut w = Writer::new();
        w.u32(17);
        let bytes = w.into_bytes();
        assert_eq!(
            get_xcrs(&mut Reader::new(&bytes)).unwrap_err(),
            FieldError::Invalid { what: "xcrs count", value: 17 }
        );
        let mut w = Writer::new();
        w.u16(MAX_MSRS as u16 + 1);
        let bytes = w.into_bytes();
        assert!(matches!(get_msrs(&mut Reader::new(&bytes)), Err(FieldError::TooMany { what: "msrs", .. })));
    }
}
