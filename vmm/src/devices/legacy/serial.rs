//! COM1 (8250 UART from vm-superio) as the guest console. Output goes to a writer
//! chosen by `--console`; each byte is a VM exit, which is why the console is off by
//! default. Guest input is not forwarded.

use std::io::{self, Write};

use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// Raises an interrupt line through a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialConsole {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl SerialConsole {
    /// `limit`: the most bytes written to `out` (a console file: the guest must not
    /// fill the host's disk through it); past it the output ends with one notice line.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>, limit: Option<u64>) -> Self {
        let mut w = ConsoleWriter::new(out);
        w.limit = limit;
        Self { uart: Serial::new(IrqTrigger(irq), w) }
    }

    /// A console on a snapshot's UART state (`snapshot::legacy`): registers and receive
    /// FIFO as the guest left them; an interrupt the state has pending is raised again.
    /// A FIFO longer than the UART's is refused.
    pub fn restore(
        irq: EventFd,
        out: Box<dyn Write + Send>,
        limit: Option<u64>,
        state: &SerialState,
    ) -> Result<Self, String> {
        let mut w = ConsoleWriter::new(out);
        w.limit = limit;
        let uart = Serial::from_state(state, IrqTrigger(irq), vm_superio::serial::NoEvents, w)
            .map_err(|e| format!("restoring the serial console: {e:?}"))?;
        Ok(Self { uart })
    }

    /// The UART's registers and receive FIFO, for a snapshot (the VM is paused).
    pub fn save_state(&self) -> SerialState {
        self.uart.state()
    }

    /// Writes out a last line that has no newline yet (the VM ended, or a test looks).
    pub fn flush_output(&mut self) {
        if let Err(e) = self.uart.writer_mut().write_pending() {
            log::debug!("serial console write failed: {e}");
        }
    }
}

/// Most bytes a console line may collect before it is written anyway.
const MAX_PENDING: usize = 4096;

/// The UART flushes after every byte; this writes whole lines instead (one write(2) per
/// line rather than per byte, and no reader woken per byte). A line without its newline
/// waits for it, for `MAX_PENDING` bytes, or for the end of the VM (`flush_output`). Guest input is
/// not forwarded, so no prompt waits on a partial line.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    pending: Vec<u8>,
    limit: Option<u64>,
    written: u64,
}

/// The line a capped console ends with.
pub const TRUNCATED_NOTICE: &[u8] =
    b"\n[wisp-vmm: console output limit reached; the rest of the guest's output is dropped]\n";

impl ConsoleWriter {
    fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out, pending: Vec::with_capacity(256), limit: None, written: 0 }
    }

    fn write_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Some(limit) = self.limit {
            if self.written >= limit {
                self.pending.clear();
                return Ok(());
            }
            let room = (limit - self.written) as usize;
            if self.pending.len() > room {
                self.pending.truncate(room);
                self.pending.extend_from_slice(TRUNCATED_NOTICE);
                self.written = limit;
            } else {
                self.written += self.pending.len() as u64;
            }
        }
        let result = self.out.write_all(&self.pending).and_then(|()| self.out.flush());
        // A failed write loses the line, never blocks the guest on it later.
        self.pending.clear();
        result
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending.last() == Some(&b'\n') || self.pending.len() >= MAX_PENDING {
            self.write_pending()
        } else {
            Ok(())
        }
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        let _ = self.write_pending();
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.uart.write(offset as u8, data[0]) {
                log::debug!("serial console write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records each write(2)-level call it gets.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Calls {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn byte_by_byte(w: &mut ConsoleWriter, text: &[u8]) {
        for b in text {
            w.write_all(&[*b]).unwrap();
            w.flush().unwrap();
        }
    }

    #[test]
    fn the_uart_state_round_trips_and_a_pending_interrupt_is_raised_again() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut console = SerialConsole::new(irq.try_clone().unwrap(), Box::new(io::sink()), None);
        // The driver sets the line control, a divisor, the scratch register, and enables
        // the transmit-empty interrupt (which the UART raises at once).
        console.write(3, &[0x83]);
        console.write(0, &[0x01]);
        console.write(3, &[0x03]);
        console.write(7, &[0x5a]);
        console.write(1, &[0x02]);
        assert_eq!(irq.read().unwrap(), 1);
        let saved = console.save_state();
        assert_eq!((saved.line_control, saved.scratch, saved.interrupt_enable), (0x03, 0x5a, 0x02));

        let irq2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut restored =
            SerialConsole::restore(irq2.try_clone().unwrap(), Box::new(io::sink()), None, &saved).unwrap();
        assert_eq!(restored.save_state(), saved);
        assert_eq!(irq2.read().unwrap(), 1, "the pending transmit-empty interrupt is raised again");
        let mut b = [0u8];
        restored.read(7, &mut b);
        assert_eq!(b[0], 0x5a);

        let mut too_long = saved.clone();
        too_long.in_buffer = vec![0; 65];
        let e = SerialConsole::restore(irq2, Box::new(io::sink()), None, &too_long).err().unwrap();
        assert!(e.contains("serial console"), "{e}");
    }

    #[test]
    fn a_capped_console_stops_at_its_limit_with_a_notice() {
        let calls = Calls::default();
        let mut w = ConsoleWriter::new(Box::new(calls.clone()));
        w.limit = Some(10);
        byte_by_byte(&mut w, b"12345\n67890abc\nmore\nand more\n");
        let all: Vec<u8> = calls.0.lock().unwrap().concat();
        let mut want = b"12345\n6789".to_vec();
        want.extend_from_slice(TRUNCATED_NOTICE);
        assert_eq!(all, want);
    }

    #[test]
    fn whole_lines_are_written_once_each() {
        let calls = Calls::default();
        let mut w = ConsoleWriter::new(Box::new(calls.clone()));
        byte_by_byte(&mut w, b"Linux version 6.12\nRun /init\npartial");
        assert_eq!(*calls.0.lock().unwrap(), vec![b"Linux version 6.12\n".to_vec(), b"Run /init\n".to_vec()]);
        drop(w);
        assert_eq!(calls.0.lock().unwrap().last().unwrap(), b"partial", "the last partial line is written at the end");
    }

    #[test]
    fn an_endless_line_is_written_in_bounded_pieces() {
        let calls = Calls::default();
        let mut w = ConsoleWriter::new(Box::new(calls.clone()));
        byte_by_byte(&mut w, &vec![b'x'; 3 * MAX_PENDING + 5]);
        let written = calls.0.lock().unwrap().clone();
        assert_eq!(written.len(), 3);
        assert!(written.iter().all(|c| c.len() == MAX_PENDING));
        assert_eq!(w.pending.len(), 5);
    }
}
