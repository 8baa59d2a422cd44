//! Where a sandbox's configuration comes from: containerd's runtime options
//! (`runtimeoptions.v1.Options{type_url, config_path}`, sent when the CRI handler table
//! has an `[options]` table) may name a config file; otherwise `WISP_CONFIG`, then
//! `/etc/wisp/config.toml`. Pod annotations then override what the operator allowed.

use std::collections::HashMap;
use std::path::PathBuf;

use wisp_config::Config;

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("runtime options: cannot decode {type_url}: {reason}")]
    Decode { type_url: String, reason: String },
    #[error(transparent)]
    Config(#[from] wisp_config::ConfigError),
}

/// The `config_path` in containerd's runtime options, if any. Unknown option types are
/// ignored (containerd sends runc's options type to every shim by default).
pub fn config_path_from_options(any: Option<&protobuf::well_known_types::any::Any>) -> Result<Option<PathBuf>, OptionsError> {
    let Some(any) = any else { return Ok(None) };
    if !any.type_url.ends_with("runtimeoptions.v1.Options") || any.value.is_empty() {
        return Ok(None);
    }
    let opts = RuntimeOptions::parse_from_bytes(&any.value)
        .map_err(|e| OptionsError::Decode { type_url: any.type_url.clone(), reason: e.to_string() })?;
    Ok((!opts.config_path.is_empty()).then(|| PathBuf::from(opts.config_path)))
}

/// Loads the configuration for a sandbox and applies the pod's annotations.
pub fn sandbox_config(config_path: Option<PathBuf>, annotations: &HashMap<String, String>) -> Result<Config, OptionsError> {
    let mut c = Config::load(config_path.as_deref())?;
    c.apply_annotations(annotations)?;
    Ok(c)
}

/// `runtimeoptions.v1.Options` (containerd's `pkg/runtimeoptions/v1`): field 1
/// `type_url`, field 2 `config_path`. Decoded by hand: two string fields.
#[derive(Debug, Default, PartialEq)]
struct RuntimeOptions {
    type_url: String,
    config_path: String,
}

impl RuntimeOptions {
    fn parse_from_bytes(b: &[u8]) -> Result<Self, protobuf::Error> {
        let mut is = protobuf::CodedInputStream::from_bytes(b);
        let mut out = RuntimeOptions::default();
        while !is.eof()? {
            let tag = is.read_raw_varint32()?;
            match tag {
                10 => out.type_url = is.read_string()?,
                18 => out.config_path = is.read_string()?,
                _ => is.skip_field(protobuf::rt::WireType::new(tag & 7).ok_or_else(|| {
                    protobuf::Error::from(std::io::Error::new(std::io::ErrorKind::InvalidData, "bad wire type"))
                })?)?,
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::well_known_types::any::Any;

    fn encode(type_url: &str, path: &str) -> Vec<u8> {
        let mut v = Vec::new();
        for (tag, s) in [(10u8, type_url), (18u8, path)] {
            v.push(tag);
            v.push(s.len() as u8);
            v.extend_from_slice(s.as_bytes());
        }
        v
    }

    #[test]
    fn decodes_config_path() {
        let any = Any {
            type_url: "type.googleapis.com/runtimeoptions.v1.Options".into(),
            value: encode("", "/etc/wisp/other.toml"),
            ..Default::default()
        };
        assert_eq!(config_path_from_options(Some(&any)).unwrap(), Some(PathBuf::from("/etc/wisp/other.toml")));
    }

    #[test]
    fn ignores_other_option_types_and_empty_paths() {
        let runc = Any { type_url: "containerd.runc.v1.Options".into(), value: vec![8, 1], ..Default::default() };
        assert_eq!(config_path_from_options(Some(&runc)).unwrap(), None);
        let empty = Any { type_url: "runtimeoptions.v1.Options".into(), value: encode("x", ""), ..Default::default() };
        assert_eq!(config_path_from_options(Some(&empty)).unwrap(), None);
        assert_eq!(config_path_from_options(None).unwrap(), None);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let bad = Any { type_url: "runtimeoptions.v1.Options".into(), value: vec![18, 50, b'x'], ..Default::default() };
        let e = config_path_from_options(Some(&bad)).unwrap_err();
        assert!(e.to_string().contains("runtimeoptions.v1.Options"), "{e}");
    }
}
