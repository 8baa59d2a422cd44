//! The VMM side of the hybrid-vsock handshake: what a host client sends on the vsock Unix
//! socket before `CONNECT <port>\n` is accepted (`wisp_vmm::...::vsock::ConnectLine`).
//! The input is the client's byte stream, delivered in chunks whose sizes come from the
//! first byte (with WouldBlock between chunks, as a non-blocking socket gives them).
//! Properties: no panic; never a byte read past the newline; a port only for a line that
//! is exactly `CONNECT <decimal u32>` (whitespace-separated) within 32 bytes.
#![no_main]

use std::io::{self, Read};

use libfuzzer_sys::fuzz_target;
use wisp_vmm::devices::virtio::vsock::{ConnectLine, HandshakeProgress};

/// Gives `data` out `chunk` bytes at a time, WouldBlock between chunks.
struct Chunked<'a> {
    data: &'a [u8],
    pos: usize,
    chunk: usize,
    in_chunk: usize,
    consumed: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.data.len() {
            return Ok(0);
        }
        if self.in_chunk == self.chunk {
            self.in_chunk = 0;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.data.len() - self.pos).min(self.chunk - self.in_chunk);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        self.in_chunk += n;
        self.consumed += n;
        Ok(n)
    }
}

/// The rule, written independently of the parser.
fn expected(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let words: Vec<&str> = text.split_whitespace().collect();
    match words.as_slice() {
        ["CONNECT", port] if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => port.parse().ok(),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else { return };
    let mut r = Chunked { data: stream, pos: 0, chunk: usize::from(chunk % 8) + 1, in_chunk: 0, consumed: 0 };
    let mut line = ConnectLine::new();
    let result = loop {
        match line.read_from(&mut r) {
            Ok(HandshakeProgress::Pending) => continue,
            other => break other,
        }
    };
    let newline = stream.iter().position(|&b| b == b'\n');
    if let Some(nl) = newline {
        assert!(r.consumed <= nl + 1, "read past the newline: {} > {}", r.consumed, nl + 1);
    }
    match result {
        Ok(HandshakeProgress::Connect(port)) => {
            let nl = newline.expect("a port without a newline");
            assert!(nl < 32, "a line of {} bytes was accepted", nl + 1);
            assert_eq!(r.consumed, nl + 1);
            assert_eq!(expected(&stream[..nl]), Some(port), "{:?}", String::from_utf8_lossy(&stream[..nl]));
        }
        Ok(HandshakeProgress::Pending) => unreachable!(),
        Err(_) => {
            if let Some(nl) = newline {
                if nl < 31 {
                    assert_eq!(expected(&stream[..nl]), None, "refused a good line");
                }
            }
        }
    }
});
