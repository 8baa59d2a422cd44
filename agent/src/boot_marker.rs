//! Boot progress markers for the VMM: one byte written to I/O port 0x505
//! (1 = userspace started, 2 = agent listening). The VMM timestamps them to measure
//! boot time. Trusts nothing; on a host (no port access) it silently does nothing.

const BOOT_MARKER_PORT: u16 = 0x505;

#[derive(Debug, Clone, Copy)]
#[repr(u8)]
pub enum BootMarker {
    UserspaceStarted = 1,
    AgentListening = 2,
}

/// Writes the marker. Needs CAP_SYS_RAWIO (PID 1 in the guest has it); any failure is
/// ignored because markers are only for measurement.
pub fn write(marker: BootMarker) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: ioperm only changes this thread's I/O permission bitmap.
        let ok = unsafe { libc::ioperm(BOOT_MARKER_PORT as libc::c_ulong, 1, 1) } == 0;
        if !ok {
            return;
        }
        let value = marker as u8;
        // SAFETY: the port was granted above; `out` to it has no memory effects.
        unsafe {
            std::arch::asm!("out dx, al", in("dx") BOOT_MARKER_PORT, in("al") value, options(nomem, nostack, preserves_flags));
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = marker;
}
