//! wisp's typed configuration: `/etc/wisp/config.toml`, its defaults, pod annotation
//! overrides and validation.
//!
//! Why it exists: the shim (`containerd-shim-wisp-v2`) must decide, for each pod,
//! which VMM, kernel and initrd to use, how big the VM is, and how long to wait for
//! the guest agent. Those choices come from an operator-written file and, for the
//! keys the operator allows, from pod annotations. This crate turns both into one
//! checked `Config` with errors an operator can act on.
//!
//! What it trusts: nothing it reads. The file is checked key by key (unknown keys,
//! types, bounds, absolute paths) and reports file, line and key; annotations are
//! untrusted pod input, accepted only for keys enabled in the file and never for
//! host paths. It does trust its own key table (`KEYS`), which is the single source
//! of truth for key names, bounds, documentation and who may override what; tests
//! hold the table, the structs, the README reference and `config.toml` together.
//!
//! ```
//! use std::collections::HashMap;
//! use wisp_config::Config;
//!
//! let mut config = Config::from_toml_str(r#"
//!     [hypervisor]
//!     vcpus = 2
//!     [runtime]
//!     enable_annotations = ["hypervisor.memory_mib"]
//! "#).unwrap();
//! let pod = HashMap::from([
//!     ("io.wisp.config.hypervisor.memory_mib".to_string(), "512".to_string()),
//! ]);
//! config.apply_annotations(&pod).unwrap();
//! assert_eq!((config.hypervisor.vcpus, config.hypervisor.memory_mib), (2, 512));
//! ```

mod annotations;
mod error;
mod keys;
mod load;
mod model;
mod parse;
mod reference;
mod source;
mod validate;

pub use error::{ConfigError, SetBy};
pub use keys::{annotatable_keys, Key, Kind, Section, ANNOTATION_PREFIX, KEYS, SECTIONS};
pub use model::{AgentConfig, Config, HypervisorConfig, RuntimeConfig};
pub use reference::{default_config_toml, reference_markdown};
pub use source::{ConfigSource, PathChoice, CONFIG_ENV, DEFAULT_CONFIG_PATH};
