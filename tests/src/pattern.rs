//! The byte pattern end-to-end tests move through the VM (vsock, disks, shared files):
//! a position-dependent stream, so lost, duplicated or reordered bytes show up.
//! Shared by the test crate and the guest-side `vsock-probe`.

/// Fills `buf` with the pattern bytes for stream offsets `offset..offset + buf.len()`.
pub fn pattern(buf: &mut [u8], offset: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        let mut x = (offset + i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^= x >> 29;
        *b = x as u8;
    }
}

/// Checks that `buf` holds the pattern at `offset`; returns the first bad offset.
pub fn first_mismatch(buf: &[u8], offset: u64) -> Option<u64> {
    let mut want = vec![0u8; buf.len()];
    pattern(&mut want, offset);
    buf.iter().zip(want.iter()).position(|(a, b)| a != b).map(|p| offset + p as u64)
}
