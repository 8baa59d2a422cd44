//! Architecture-specific code. Generic VMM code never hard-codes x86 addresses; it
//! asks `arch::layout` and the boot functions here.

pub mod x86_64;
pub use x86_64::*;
