//! The header that opens each stdio stream connection to the agent (guest vsock port
//! 1025). After it, the connection carries raw bytes of one stream: host to guest for
//! stdin (a write half-close is stdin EOF), guest to host for stdout and stderr (EOF
//! when the process's side is closed), both ways for a TTY.
//!
//! Wire format (all integers big-endian):
//! `"WSIO"` | version u8 (1) | stream u8 | cid_len u16 | container_id | eid_len u16 | exec_id
//! The agent answers one byte: 0 = attached, anything else = refused (then closes).
//! IDs are at most 256 bytes each; the header is untrusted input on the agent side.

use std::io::{self, Read, Write};

pub const MAGIC: &[u8; 4] = b"WSIO";
pub const VERSION: u8 = 1;
pub const MAX_ID_LEN: usize = 256;
pub const ATTACHED: u8 = 0;
pub const REFUSED: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
    /// The pty: guest output and host input on one connection.
    Tty,
}

impl StreamKind {
    fn code(self) -> u8 {
        match self {
            StreamKind::Stdin => 0,
            StreamKind::Stdout => 1,
            StreamKind::Stderr => 2,
            StreamKind::Tty => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => StreamKind::Stdin,
            1 => StreamKind::Stdout,
            2 => StreamKind::Stderr,
            3 => StreamKind::Tty,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub container_id: String,
    /// "" for the container's init process.
    pub exec_id: String,
    pub stream: StreamKind,
}

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("stream header: bad magic (not a wisp stdio stream)")]
    Magic,
    #[error("stream header: unsupported version {0}")]
    Version(u8),
    #[error("stream header: unknown stream kind {0}")]
    Kind(u8),
    #[error("stream header: id of {0} bytes is longer than {MAX_ID_LEN}")]
    IdTooLong(usize),
    #[error("stream header: id is not UTF-8")]
    NotUtf8,
    #[error("stream header: {0}")]
    Io(#[from] io::Error),
}

impl StreamHeader {
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        let mut out = Vec::with_capacity(10 + self.container_id.len() + self.exec_id.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.push(self.stream.code());
        for id in [&self.container_id, &self.exec_id] {
            if id.len() > MAX_ID_LEN {
                return Err(HeaderError::IdTooLong(id.len()));
            }
            out.extend_from_slice(&(id.len() as u16).to_be_bytes());
            out.extend_from_slice(id.as_bytes());
        }
        Ok(out)
    }

    pub fn write_to(&self, w: &mut impl Write) -> Result<(), HeaderError> {
        w.write_all(&self.encode()?)?;
        Ok(())
    }

    /// Reads exactly one header; never reads past it.
    pub fn read_from(r: &mut impl Read) -> Result<Self, HeaderError> {
        let mut fixed = [0u8; 6];
        r.read_exact(&mut fixed)?;
        if &fixed[0..4] != MAGIC {
            return Err(HeaderError::Magic);
        }
        if fixed[4] != VERSION {
            return Err(HeaderError::Version(fixed[4]));
        }
        let stream = StreamKind::from_code(fixed[5]).ok_or(HeaderError::Kind(fixed[5]))?;
        let container_id = read_id(r)?;
        let exec_id = read_id(r)?;
        Ok(Self { container_id, exec_id, stream })
    }
}

fn read_id(r: &mut impl Read) -> Result<String, HeaderError> {
    let mut len = [0u8; 2];
    r.read_exact(&mut len)?;
    let len = u16::from_be_bytes(len) as usize;
    if len > MAX_ID_LEN {
        return Err(HeaderError::IdTooLong(len));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)?;
    String::from_utf8(buf).map_err(|_| HeaderError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_without_reading_past_the_header() {
        let h = StreamHeader { container_id: "c1".into(), exec_id: "e-9".into(), stream: StreamKind::Stderr };
        let mut bytes = h.encode().unwrap();
        bytes.extend_from_slice(b"data");
        let mut cur = std::io::Cursor::new(bytes);
        assert_eq!(StreamHeader::read_from(&mut cur).unwrap(), h);
        let mut rest = String::new();
        cur.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "data");
    }

    #[test]
    fn malformed_headers_are_refused() {
        let bad = |b: &[u8]| StreamHeader::read_from(&mut std::io::Cursor::new(b.to_vec())).unwrap_err();
        assert!(matches!(bad(b"XXXX\x01\x00\x00\x00\x00\x00"), HeaderError::Magic));
        assert!(matches!(bad(b"WSIO\x02\x00\x00\x00\x00\x00"), HeaderError::Version(2)));
        assert!(matches!(bad(b"WSIO\x01\x09\x00\x00\x00\x00"), HeaderError::Kind(9)));
        assert!(matches!(bad(b"WSIO\x01\x00\xff\xff"), HeaderError::IdTooLong(65535)));
        assert!(matches!(bad(b"WSIO\x01\x00\x00\x02\xff\xfe\x00\x00"), HeaderError::NotUtf8));
        assert!(matches!(bad(b"WSIO\x01\x00\x00\x05ab"), HeaderError::Io(_)));
        let long = StreamHeader { container_id: "x".repeat(300), exec_id: String::new(), stream: StreamKind::Stdin };
        assert!(matches!(long.encode(), Err(HeaderError::IdTooLong(300))));
    }
}
