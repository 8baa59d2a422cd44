//! The hybrid-vsock handshake a host client starts with: `CONNECT <port>\n`, as in
//! Firecracker (words separated by whitespace, port in decimal).
//!
//! The line is read one byte at a time so not a byte of the payload that may follow it
//! in the same write is consumed; it is at most `MAX_CONNECT_LINE` bytes long.

use std::io::{self, ErrorKind, Read};

/// Longest accepted handshake line, newline included.
pub const MAX_CONNECT_LINE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("host client closed its connection before finishing its CONNECT line")]
    Closed,
    #[error("host client sent no newline within {MAX_CONNECT_LINE} bytes")]
    TooLong,
    #[error("host client sent {0:?}, expected \"CONNECT <port>\"")]
    Malformed(String),
    #[error("reading the host client's CONNECT line failed: {0}")]
    Io(io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeProgress {
    /// The line is incomplete and the stream has nothing more for now.
    Pending,
    /// The client asked for this guest port.
    Connect(u32),
}

/// A partially read handshake line.
#[derive(Debug, Default)]
pub struct ConnectLine {
    line: Vec<u8>,
}

impl ConnectLine {
    pub fn new() -> Self {
        Self { line: Vec::with_capacity(MAX_CONNECT_LINE) }
    }

    /// Reads what `stream` has of the line, never past its newline.
    pub fn read_from<R: Read>(&mut self, stream: &mut R) -> Result<HandshakeProgress, HandshakeError> {
        loop {
            let mut byte = [0u8; 1];
            match stream.read(&mut byte) {
                Ok(0) => return Err(HandshakeError::Closed),
                Ok(_) if byte[0] == b'\n' => return Self::parse(&self.line).map(HandshakeProgress::Connect),
                Ok(_) => {
                    // Room is kept for the newline.
                    if self.line.len() + 1 >= MAX_CONNECT_LINE {
                        return Err(HandshakeError::TooLong);
                    }
                    self.line.push(byte[0]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(HandshakeProgress::Pending),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(HandshakeError::Io(e)),
            }
        }
    }

    fn parse(line: &[u8]) -> Result<u32, HandshakeError> {
        let malformed = || HandshakeError::Malformed(String::from_utf8_lossy(line).into_owned());
        let text = std::str::from_utf8(line).map_err(|_| malformed())?;
        let mut words = text.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("CONNECT"), Some(port), None) if port.bytes().all(|b| b.is_ascii_digit()) => {
                port.parse::<u32>().map_err(|_| malformed())
            }
            _ => Err(malformed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn parse_all(input: &[u8]) -> Result<HandshakeProgress, HandshakeError> {
        let mut reader = input;
        ConnectLine::new().read_from(&mut reader)
    }

    #[test]
    fn accepts_firecracker_style_lines() {
        assert_eq!(parse_all(b"CONNECT 1024\n").unwrap(), HandshakeProgress::Connect(1024));
        assert_eq!(parse_all(b"CONNECT 0\n").unwrap(), HandshakeProgress::Connect(0));
        assert_eq!(parse_all(b"CONNECT 4294967295\n").unwrap(), HandshakeProgress::Connect(u32::MAX));
        assert_eq!(parse_all(b"CONNECT   52\r\n").unwrap(), HandshakeProgress::Connect(52));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            &b"CONNECT\n"[..],
            b"CONNECT -1\n",
            b"CONNECT +5\n",
            b"CONNECT 4294967296\n",
            b"CONNECT 1 2\n",
            b"connect 1024\n",
            b"LISTEN 1024\n",
            b"\n",
            b"CONNECT 0x10\n",
            b"CONNECT \xff\n",
        ] {
            assert!(matches!(parse_all(bad), Err(HandshakeError::Malformed(_))), "{bad:?}");
        }
        assert!(matches!(parse_all(b"CONNECT 1024"), Err(HandshakeError::Closed)));
        assert!(matches!(parse_all(&[b'A'; 100]), Err(HandshakeError::TooLong)));
        let padded = format!("CONNECT {}1\n", "0".repeat(22));
        assert_eq!(padded.len(), MAX_CONNECT_LINE);
        assert_eq!(parse_all(padded.as_bytes()).unwrap(), HandshakeProgress::Connect(1));
        let too_long = format!("CONNECT {}1\n", "0".repeat(23));
        assert!(matches!(parse_all(too_long.as_bytes()), Err(HandshakeError::TooLong)));
    }

    #[test]
    fn reads_incrementally_and_never_past_the_newline() {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        server.set_nonblocking(true).unwrap();
        let mut line = ConnectLine::new();
        assert_eq!(line.read_from(&mut server).unwrap(), HandshakeProgress::Pending);
        client.write_all(b"CONN").unwrap();
        assert_eq!(line.read_from(&mut server).unwrap(), HandshakeProgress::Pending);
        client.write_all(b"ECT 77\npayload").unwrap();
        assert_eq!(line.read_from(&mut server).unwrap(), HandshakeProgress::Connect(77));
        let mut rest = [0u8; 7];
        server.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"payload");
    }
}
