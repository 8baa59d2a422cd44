//! The byte-level encoding every snapshot section uses: little-endian integers,
//! length-prefixed strings and lists, and the CRC-32 that guards each section.
//!
//! Trust: `Reader` reads a section of a file that may be truncated, corrupted or made
//! by hand. Every read is bounds-checked and returns a `FieldError` naming the field;
//! every count or length read from the input is checked against a maximum the caller
//! gives and against the bytes left before anything is allocated for it.

/// What is wrong inside one section's payload (after its checksum matched).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("reading {what} needs {need} bytes at offset {at}, only {have} left")]
    Truncated { what: &'static str, at: usize, need: usize, have: usize },
    #[error("{what} has {count} entries, at most {max} are allowed")]
    TooMany { what: &'static str, count: usize, max: usize },
    #[error("{what} is not UTF-8")]
    NotUtf8 { what: &'static str },
    #[error("{extra} bytes follow the last field")]
    Trailing { extra: usize },
    #[error("{what} is {value}, which is not valid here")]
    Invalid { what: &'static str, value: u64 },
    #[error("configuration key {0:?} appears twice")]
    DuplicateKey(String),
}

/// Appends fields to a section payload.
#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// A boolean as one byte, 0 or 1.
    pub fn flag(&mut self, v: bool) {
        self.u8(u8::from(v));
    }

    pub fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }

    /// A count prefix (u16) for a list of `n` entries. Callers keep their lists within
    /// the maximum the matching `Reader::count` enforces; a longer list is a bug.
    pub fn count(&mut self, n: usize) {
        debug_assert!(n <= usize::from(u16::MAX));
        self.u16(n as u16);
    }

    /// A string as a u16 byte length then UTF-8 bytes.
    pub fn str(&mut self, s: &str) {
        self.count(s.len());
        self.bytes(s.as_bytes());
    }
}

/// Reads fields from a section payload; every read says which field it is for.
pub struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, at: 0 }
    }

    fn left(&self) -> usize {
        self.buf.len() - self.at
    }

    /// How many bytes have been read.
    pub fn position(&self) -> usize {
        self.at
    }

    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], FieldError> {
        if n > self.left() {
            return Err(FieldError::Truncated { what, at: self.at, need: n, have: self.left() });
        }
        let out = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FieldError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, FieldError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// A boolean stored as one byte: 0 or 1, anything else refused.
    pub fn flag(&mut self, what: &'static str) -> Result<bool, FieldError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(FieldError::Invalid { what, value: u64::from(v) }),
        }
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, FieldError> {
        self.array(what).map(u16::from_le_bytes)
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, FieldError> {
        self.array(what).map(u32::from_le_bytes)
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, FieldError> {
        self.array(what).map(u64::from_le_bytes)
    }

    pub fn i64(&mut self, what: &'static str) -> Result<i64, FieldError> {
        self.array(what).map(i64::from_le_bytes)
    }

    /// Fills `out` from the input.
    pub fn fill(&mut self, out: &mut [u8], what: &'static str) -> Result<(), FieldError> {
        out.copy_from_slice(self.take(out.len(), what)?);
        Ok(())
    }

    /// A list count: at most `max`, and at most as many entries of `entry_size` bytes
    /// as are left, so a caller can allocate `count` entries safely.
    pub fn count(&mut self, max: usize, entry_size: usize, what: &'static str) -> Result<usize, FieldError> {
        let count = usize::from(self.u16(what)?);
        if count > max {
            return Err(FieldError::TooMany { what, count, max });
        }
        let need = count * entry_size;
        if need > self.left() {
            return Err(FieldError::Truncated { what, at: self.at, need, have: self.left() });
        }
        Ok(count)
    }

    /// A string of at most `max` bytes.
    pub fn str(&mut self, max: usize, what: &'static str) -> Result<String, FieldError> {
        let len = self.count(max, 1, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FieldError::NotUtf8 { what })
    }

    /// Ends the section: every byte must have been read.
    pub fn finish(self) -> Result<(), FieldError> {
        match self.left() {
            0 => Ok(()),
            extra => Err(FieldError::Trailing { extra }),
        }
    }
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320: the one zlib, gzip and
/// Python's `zlib.crc32` compute), so the fuzz seeds can be written by a script.
pub fn crc32(data: &[u8]) -> u32 {
    !crc32_update(!0, data)
}

/// Continues a CRC-32 over more data: `state` starts at `!0`, the result is `!state`.
pub fn crc32_update(mut state: u32, data: &[u8]) -> u32 {
    for &b in data {
        state = CRC32_TABLE[((state ^ u32::from(b)) & 0xff) as usize] ^ (state >> 8);
    }
    state
}

const CRC32_TABLE: [u32; 256] = crc32_table();

const fn crc32_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        // The CRC catalogue's check value for CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        let split = !crc32_update(crc32_update(!0, b"1234"), b"56789");
        assert_eq!(split, 0xcbf4_3926);
    }

    #[test]
    fn fields_round_trip() {
        let mut w = Writer::new();
        w.u8(7);
        w.u16(0xbeef);
        w.u32(0xdead_beef);
        w.u64(u64::MAX - 1);
        w.i64(-5);
        w.str("héllo");
        let bytes = w.into_bytes();
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u16("b").unwrap(), 0xbeef);
        assert_eq!(r.u32("c").unwrap(), 0xdead_beef);
        assert_eq!(r.u64("d").unwrap(), u64::MAX - 1);
        assert_eq!(r.i64("e").unwrap(), -5);
        assert_eq!(r.str(16, "f").unwrap(), "héllo");
        r.finish().unwrap();
    }

    #[test]
    fn reads_past_the_end_name_the_field() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16("x").unwrap(), 0x0201);
        assert_eq!(r.u32("rip").unwrap_err(), FieldError::Truncated { what: "rip", at: 2, need: 4, have: 1 });
    }

    #[test]
    fn counts_are_bounded_before_allocation() {
        // 60000 entries of 40 bytes claimed by a 2-byte input.
        let mut r = Reader::new(&[0x60, 0xea]);
        assert!(matches!(r.count(100, 40, "cpuid"), Err(FieldError::TooMany { count: 60000, max: 100, .. })));
        let mut r = Reader::new(&[3, 0, 1, 2]);
        assert!(matches!(r.count(100, 40, "cpuid"), Err(FieldError::Truncated { need: 120, have: 2, .. })));
        let mut r = Reader::new(&[2, 0, 0xff, 0xfe]);
        assert_eq!(r.str(8, "name").unwrap_err(), FieldError::NotUtf8 { what: "name" });
        let r = Reader::new(&[0]);
        assert_eq!(r.finish().unwrap_err(), FieldError::Trailing { extra: 1 });
    }
}
