//! Legacy port-I/O devices: the 8250 serial console, the i8042 controller (whose reset
//! line is how a guest reboots) and wisp's boot marker port.

mod boot_marker;
mod i8042;
mod serial;

pub use boot_marker::{BootMarker, BootTimeline, Milestone};
pub use i8042::I8042;
pub use serial::{IrqTrigger, SerialConsole};
