//! MAC addresses as wisp writes them, `02:00:0a:58:00:05`: the shim passes the guest
//! NIC's to the VMM (`--net ...,mac=`) and to the agent (the agent API's interface
//! updates); both parse them here.

/// Parses `AA:BB:CC:DD:EE:FF`: six pairs of hex digits (either case) separated by `:`.
/// Only the syntax: whether the address suits a NIC (unicast, not all zeros) is the
/// caller's rule. The error quotes the input and shows the expected form.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{s:?} is not a MAC address (want six hex pairs such as 02:00:00:00:00:01)");
    let hex_pair = |p: &&str| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit());
    let mut parts = s.split(':');
    let mut mac = [0u8; 6];
    for byte in mac.iter_mut() {
        let part = parts.next().filter(hex_pair).ok_or_else(bad)?;
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_malformed_ones_are_refused() {
        assert_eq!(parse_mac("02:00:0a:58:00:05"), Ok([2, 0, 10, 0x58, 0, 5]));
        assert_eq!(parse_mac("02:AB:cd:00:10:ff"), Ok([0x02, 0xab, 0xcd, 0x00, 0x10, 0xff]));
        // The syntax only: multicast and all-zero addresses are the caller's to refuse.
        assert_eq!(parse_mac("ff:ff:ff:ff:ff:ff"), Ok([0xff; 6]));
        assert_eq!(parse_mac("00:00:00:00:00:00"), Ok([0; 6]));
        let malformed = [
            "",
            ":::::",
            "02:00",
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "02:00:00:00:00:00:",
            "02:00:0a:58:00:zz",
            "02:00:0a:58:00:005",
            "02:00:00:00:00:0",
            "02:00:00:00:00:+1",
            "+2:00:00:00:00:01",
            "0x:00:00:00:00:01",
            "02-00-0a-58-00-05",
            " 02:00:00:00:00:01",
            "02:00:00:00:00:01\n",
            "٠٢:00:00:00:00:01",
        ];
        for bad in malformed {
            let e = parse_mac(bad).unwrap_err();
            assert!(e.contains("is not a MAC address") && e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }
    }
}
