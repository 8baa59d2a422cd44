//! The legacy devices' state in a snapshot: the COM1 UART's registers and its receive
//! FIFO (vm-superio's `SerialState`, taken by `SerialConsole::save_state` and put back
//! by `SerialConsole::restore`). The i8042 has no state to keep: it is there for its
//! reset line only and answers every read from constants.
//!
//! Trust: the registers are whatever the guest wrote to them; `decode` bounds the FIFO
//! to the UART's 64 bytes, as vm-superio's restore does.

use vm_superio::serial::SerialState;

use super::codec::{FieldError, Reader, Writer};

/// The UART's receive FIFO (vm-superio's `FIFO_SIZE`).
pub const MAX_SERIAL_FIFO: usize = 64;

/// The legacy devices' state: the serial console's, if the VM has one (vm-superio's
/// own state struct: its registers and receive FIFO).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LegacyState {
    pub serial: Option<SerialState>,
}

impl LegacyState {
    pub fn encode(&self, w: &mut Writer) {
        w.flag(self.serial.is_some());
        if let Some(s) = &self.serial {
            debug_assert!(s.in_buffer.len() <= MAX_SERIAL_FIFO);
            for b in [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ] {
                w.u8(b);
            }
            w.count(s.in_buffer.len());
            w.bytes(&s.in_buffer);
        }
    }

    pub fn decode(r: &mut Reader) -> Result<Self, FieldError> {
        if !r.flag("serial present")? {
            return Ok(Self { serial: None });
        }
        let mut regs = [0u8; 9];
        r.fill(&mut regs, "serial registers")?;
        let n = r.count(MAX_SERIAL_FIFO, 1, "serial receive FIFO")?;
        let in_buffer = r.take(n, "serial receive FIFO")?.to_vec();
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            regs;
        Ok(Self {
            serial: Some(SerialState {
                baud_divisor_low,
                baud_divisor_high,
                interrupt_enable,
                interrupt_identification,
                line_control,
                line_status,
                modem_control,
                modem_status,
                scratch,
                in_buffer,
            }),
        })
    }
}
