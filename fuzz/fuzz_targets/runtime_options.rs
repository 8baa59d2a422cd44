//! containerd's runtime options as the shim decodes them
//! (`wisp_shim::options::config_path_from_options`): a hand-written protobuf decoder for
//! `runtimeoptions.v1.Options`. The first byte picks the `Any` type URL. Properties: no
//! panic; garbage is a `Decode` error naming the type; other types are ignored.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protobuf::well_known_types::any::Any;
use wisp_shim::options::config_path_from_options;

const TYPE_URLS: [&str; 3] =
    ["type.googleapis.com/runtimeoptions.v1.Options", "runtimeoptions.v1.Options", "containerd.runc.v1.Options"];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, value)) = data.split_first() else { return };
    let type_url = TYPE_URLS[usize::from(sel) % TYPE_URLS.len()];
    let any = Any { type_url: type_url.into(), value: value.to_vec(), ..Default::default() };
    match config_path_from_options(Some(&any)) {
        Ok(Some(path)) => assert!(!path.as_os_str().is_empty()),
        Ok(None) => {}
        Err(e) => {
            assert!(type_url.ends_with("runtimeoptions.v1.Options"), "{type_url}: {e}");
            assert!(e.to_string().contains(type_url), "{e}");
        }
    }
});
