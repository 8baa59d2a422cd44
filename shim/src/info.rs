//! `containerd-shim-wisp-v2 -info`: containerd 2.x runs the shim binary with `-info`,
//! the task's runtime options (a protobuf `Any`, possibly empty) on stdin, and reads a
//! `containerd.types.RuntimeInfo` from stdout (introspection's PluginInfo, and the check
//! for a shim's mount capabilities before every task). containerd 1.6 never asks.
//!
//! wisp reports its name and version, echoes the options, and declares the OCI runtime
//! `features` (runtime-spec features.md) its guest side implements: the OCI versions and
//! the mount options the agent's libcontainer applies. containerd's CRI reads them to
//! decide whether the handler supports recursive read-only mounts (`rro`: applied in the
//! guest with mount_setattr, kernel 6.12) and user namespaces (not declared: wisp has no
//! idmapped mounts). No annotations.

use protobuf::well_known_types::any::Any;
use protobuf::{CodedOutputStream, Message};

/// The most stdin may hold: runtime options are a path or two.
pub const MAX_OPTIONS: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error("-info: the runtime options on stdin are larger than {MAX_OPTIONS} bytes")]
    TooLarge,
    #[error("-info: the runtime options on stdin are not a protobuf Any: {0}")]
    Decode(String),
}

/// The type URL containerd registers for runtime-spec's `features.Features` (JSON value).
const FEATURES_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// Mount options the agent's libcontainer (0.7) applies, `rro` among them.
const MOUNT_OPTIONS: &[&str] = &[
    "async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec", "mand", "noatime", "nodev",
    "nodiratime", "noexec", "nomand", "norelatime", "nostrictatime", "nosuid", "private", "ratime", "rbind", "rdev",
    "rdiratime", "relatime", "remount", "rexec", "rnoatime", "rnodev", "rnodiratime", "rnoexec", "rnorelatime",
    "rnostrictatime", "rnosuid", "rnosymfollow", "ro", "rprivate", "rrelatime", "rro", "rrw", "rshared", "rslave",
    "rstrictatime", "rsuid", "rsymfollow", "runbindable", "rw", "shared", "slave", "strictatime", "suid", "sync",
    "unbindable",
];

/// runtime-spec's `features.Features` for wisp, as JSON.
fn features_json() -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.1",
        "mountOptions": MOUNT_OPTIONS,
    }))
    .expect("serializing a JSON literal")
}

/// The encoded `RuntimeInfo` for `options` (the bytes containerd wrote to stdin).
pub fn runtime_info(options: &[u8]) -> Result<Vec<u8>, InfoError> {
    if options.len() as u64 > MAX_OPTIONS {
        return Err(InfoError::TooLarge);
    }
    let any = if options.is_empty() {
        None
    } else {
        Some(Any::parse_from_bytes(options).map_err(|e| InfoError::Decode(e.to_string()))?)
    };
    let mut version = Vec::new();
    {
        let mut os = CodedOutputStream::vec(&mut version);
        os.write_string(1, env!("CARGO_PKG_VERSION")).expect("writing to a Vec");
        os.flush().expect("writing to a Vec");
    }
    let mut out = Vec::new();
    {
        let mut os = CodedOutputStream::vec(&mut out);
        os.write_string(1, crate::shim::RUNTIME_ID).expect("writing to a Vec");
        os.write_bytes(2, &version).expect("writing to a Vec");
        if let Some(any) = any {
            os.write_bytes(3, &any.write_to_bytes().expect("encoding an Any")).expect("writing to a Vec");
        }
        let features = Any { type_url: FEATURES_TYPE_URL.into(), value: features_json(), ..Default::default() };
        os.write_bytes(4, &features.write_to_bytes().expect("encoding an Any")).expect("writing to a Vec");
        os.flush().expect("writing to a Vec");
    }
    Ok(out)
}

/// Runs `-info`: stdin to stdout, or a clear error and exit status 1.
pub fn run() -> ! {
    use std::io::{Read, Write};
    let mut options = Vec::new();
    let read = std::io::stdin().take(MAX_OPTIONS + 1).read_to_end(&mut options);
    let result = match read {
        Ok(_) => runtime_info(&options),
        Err(e) => Err(InfoError::Decode(format!("reading stdin: {e}"))),
    };
    match result {
        Ok(bytes) => {
            let mut out = std::io::stdout().lock();
            if out.write_all(&bytes).and_then(|_| out.flush()).is_err() {
                std::process::exit(1);
            }
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("{}: {e}", crate::shim::RUNTIME_ID);
            std::process::exit(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::CodedInputStream;

    /// (field number, bytes) of each length-delimited field.
    fn fields(b: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut is = CodedInputStream::from_bytes(b);
        let mut out = Vec::new();
        while !is.eof().unwrap() {
            let tag = is.read_raw_varint32().unwrap();
            assert_eq!(tag & 7, 2, "every RuntimeInfo field wisp writes is length-delimited");
            out.push((tag >> 3, is.read_bytes().unwrap()));
        }
        out
    }

    #[test]
    fn names_the_runtime_and_its_version() {
        let f = fields(&runtime_info(&[]).unwrap());
        assert_eq!(f[0], (1, crate::shim::RUNTIME_ID.as_bytes().to_vec()));
        assert_eq!(f[1].0, 2);
        assert_eq!(fields(&f[1].1), vec![(1, env!("CARGO_PKG_VERSION").as_bytes().to_vec())]);
        assert_eq!(f.len(), 3, "no options field without options");
        assert_eq!(f[2].0, 4, "the features come last");
    }

    /// containerd's CRI turns `rro` in the features into RecursiveReadOnlyMounts for the
    /// handler: declared, and every option declared is one libcontainer parses.
    #[test]
    fn declares_the_oci_features_with_rro() {
        let f = fields(&runtime_info(&[]).unwrap());
        let any = Any::parse_from_bytes(&f[2].1).unwrap();
        assert_eq!(any.type_url, FEATURES_TYPE_URL);
        let v: serde_json::Value = serde_json::from_slice(&any.value).unwrap();
        let opts: Vec<&str> = v["mountOptions"].as_array().unwrap().iter().map(|o| o.as_str().unwrap()).collect();
        assert!(opts.contains(&"rro") && opts.contains(&"ro") && opts.contains(&"rbind"), "{opts:?}");
        assert!(v.get("linux").is_none(), "no idmapped mounts, so no user namespace support declared");
        let mut sorted = opts.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, opts, "declared options are sorted and unique");
    }

    #[test]
    fn echoes_the_options() {
        let any = Any { type_url: "runtimeoptions.v1.Options".into(), value: vec![18, 1, b'x'], ..Default::default() };
        let f = fields(&runtime_info(&any.write_to_bytes().unwrap()).unwrap());
        assert_eq!(f[2].0, 3);
        assert_eq!(Any::parse_from_bytes(&f[2].1).unwrap(), any);
        assert_eq!(f[3].0, 4);
    }

    #[test]
    fn malformed_or_huge_options_are_clear_errors() {
        let e = runtime_info(&[0x0a, 0x7f, b'x']).unwrap_err();
        assert!(e.to_string().contains("not a protobuf Any"), "{e}");
        let e = runtime_info(&vec![0u8; MAX_OPTIONS as usize + 1]).unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }
}
