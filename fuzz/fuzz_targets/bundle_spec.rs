//! The shim's reading of a bundle's OCI spec (`wisp_shim::spec::BundleSpec`): `parse`,
//! which reads everything the shim uses of it once (annotations, binds, network namespace,
//! hooks, hostname, cgroup), then the sandbox id, root path and the guest's spec
//! (`for_guest`) with submounts under every bind.
//! Properties: no panic; malformed JSON is an error naming the origin; every shared bind
//! reappears in the guest spec with its source moved onto the share.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use wisp_shim::spec::{BundleSpec, GuestSubmount, GuestSubmounts, GUEST_SHARED_DIR};

fuzz_target!(|data: &[u8]| {
    let spec = match BundleSpec::parse(data, "fuzz/config.json") {
        Ok(s) => s,
        Err(e) => {
            assert!(e.to_string().contains("fuzz/config.json"), "{e}");
            return;
        }
    };
    let _ = spec.sandbox_id("c1");
    let _ = spec.is_sandbox_container();
    let _ = spec.root_path(Path::new("/run/bundle"));
    let binds = &spec.binds;
    let submounts: GuestSubmounts = binds
        .iter()
        .map(|b| {
            let subs = vec![
                GuestSubmount { path: "sub".into(), read_only: false },
                GuestSubmount { path: "sub/deep dir".into(), read_only: true },
            ];
            (b.index, subs)
        })
        .collect();
    let guest = spec.for_guest("c1", &submounts);
    assert_eq!(
        guest.pointer("/root/path").and_then(|v| v.as_str()),
        Some(format!("{GUEST_SHARED_DIR}/c1/rootfs").as_str()),
        "the guest's root is on the share"
    );
    let mounts = guest.get("mounts").and_then(|m| m.as_array()).cloned().unwrap_or_default();
    for b in binds {
        let source = format!("{GUEST_SHARED_DIR}/c1/{}", b.share_name());
        assert!(
            mounts.iter().any(|m| m.get("source").and_then(|s| s.as_str()) == Some(source.as_str())),
            "bind {} lost in the guest spec",
            b.index
        );
    }
    let expected = mounts.len();
    let original = spec.json.get("mounts").and_then(|m| m.as_array()).map_or(0, |m| m.len());
    if spec.json.get("mounts").is_some_and(|m| m.is_array()) {
        assert_eq!(expected, original + 2 * binds.len(), "each bind brings exactly its two submounts");
    }
});
