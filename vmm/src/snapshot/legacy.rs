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

/// The legacy devices' state: the serial console's, if the VM has one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LegacyState {
    pub serial: Option<SerialRegs>,
}

/// The UART's registers and FIFO, in a form this crate encodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialRegs {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialRegs {
    fn from(s: SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegs> for SerialState {
    fn from(s: &SerialRegs) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
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
            serial: Some(SerialRegs {
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
