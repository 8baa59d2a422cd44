//! The stdio stream header (`wisp_protocols::stdio::StreamHeader`), untrusted input on the
//! agent's side. Properties: no panic; never reads past the header; what it accepts
//! encodes back to exactly the bytes it read, and every decoded id is at most 256 bytes.
#![no_main]

use std::io::{Cursor, Read};

use libfuzzer_sys::fuzz_target;
use wisp_protocols::stdio::{StreamHeader, MAX_ID_LEN};

fuzz_target!(|data: &[u8]| {
    let mut cur = Cursor::new(data);
    if let Ok(h) = StreamHeader::read_from(&mut cur) {
        let used = cur.position() as usize;
        assert!(h.container_id.len() <= MAX_ID_LEN && h.exec_id.len() <= MAX_ID_LEN);
        let encoded = h.encode().expect("a decoded header encodes");
        assert_eq!(&encoded[..], &data[..used], "round trip");
        let mut rest = Vec::new();
        cur.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, &data[used..], "read past the header");
        // The id rule the agent applies next must not panic either.
        let _ = wisp_protocols::ids::check_id(&h.container_id);
        let _ = wisp_protocols::ids::check_id(&h.exec_id);
    }
});
