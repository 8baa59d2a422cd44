//! x86_64: guest memory layout, kernel loading, boot protocols (PVH and the 64-bit
//! Linux boot protocol), vCPU register/CPUID/MSR setup, interrupt controllers and the
//! MP table that tells a guest without ACPI about its CPUs and IOAPIC.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod interrupts;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
