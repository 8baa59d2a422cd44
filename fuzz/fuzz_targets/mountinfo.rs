//! The shim's mount table parser (`wisp_shim::mountinfo`): `parse` on any text (mount
//! points are host paths with octal escapes), then `submounts` of every entry and
//! `mount_points_below` a few directories. Properties: no panic, no hang on cyclic or
//! self-parented tables; submounts are strictly below their top and each comes once.
#![no_main]

use std::collections::HashSet;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use wisp_shim::mountinfo::{mount_points_below, parse, submounts};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let entries = parse(&text);
    assert!(entries.len() <= text.lines().count());
    for e in entries.iter().take(64) {
        assert_eq!(e.read_only, e.options.iter().any(|o| o == "ro"));
        let subs = submounts(&entries, e.id);
        let mut seen = HashSet::new();
        for (rel, sub) in &subs {
            assert!(seen.insert(*sub as *const _), "a submount listed twice");
            assert_ne!(sub.id, e.id, "a mount is its own submount");
            assert!(rel.is_relative() || rel.as_os_str().is_empty());
        }
    }
    for dir in ["/", "/run/wisp", "/run/wisp/sb1/shared"] {
        let below = mount_points_below(&entries, Path::new(dir));
        assert!(below.iter().all(|p| p.starts_with(dir)));
        assert!(below.windows(2).all(|w| w[0].components().count() >= w[1].components().count()));
    }
});
