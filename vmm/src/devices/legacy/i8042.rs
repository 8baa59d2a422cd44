//! The i8042 keyboard controller, present only for its reset line: a guest booted with
//! `reboot=k` writes 0xfe to port 0x64 to reboot, which ends the VM.

use vm_superio::{I8042Device, Trigger};

use crate::devices::bus::BusDevice;

/// Called when the guest pulses the reset line.
pub struct ResetLine(pub Box<dyn Fn() + Send>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}

pub struct I8042 {
    dev: I8042Device<ResetLine>,
}

impl I8042 {
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        Self { dev: I8042Device::new(ResetLine(on_reset)) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset <= 4 {
            data[0] = self.dev.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset <= 4 {
            let _ = self.dev.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn reset_command_fires_the_reset_line() {
        let fired = Arc::new(AtomicBool::new(false));
        let f = fired.clone();
        let mut dev = I8042::new(Box::new(move || f.store(true, Ordering::SeqCst)));
        dev.write(4, &[0xfe]);
        assert!(fired.load(Ordering::SeqCst));
    }
}
