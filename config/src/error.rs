//! The one error type of the crate.
//!
//! Every message is written for the operator who edits the config file or the pod
//! spec: it says where the bad value came from (file, default location, annotation),
//! which key, what the value was and what is allowed.

use std::fmt;
use std::io;
use std::path::PathBuf;

use crate::source::{ConfigSource, PathChoice};

/// Where one setting's value came from: the configuration (file, inline text or
/// built-in defaults) or a pod annotation. Used as the prefix of value errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetBy {
    /// The value was read from (or defaulted by) this configuration.
    Config(ConfigSource),
    /// The value was set by this pod annotation, e.g. `io.wisp.config.hypervisor.vcpus`.
    Annotation(String),
}

impl fmt::Display for SetBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetBy::Config(source) => write!(f, "{source}"),
            SetBy::Annotation(name) => write!(f, "annotation {name}"),
        }
    }
}

/// Everything that can go wrong while finding, reading, parsing, validating or
/// overriding the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// An explicitly chosen config file (shim option or `WISP_CONFIG`) does not exist.
    /// Only the default location may be absent.
    #[error("config file {path} ({chosen_by}) does not exist; {}", .chosen_by.missing_hint())]
    NotFound {
        path: PathBuf,
        chosen_by: PathChoice,
    },

    /// The shim option or `WISP_CONFIG` named a relative path. The shim runs in
    /// containerd's bundle directory, so a relative path would not mean what was meant.
    #[error("config file path {path} ({chosen_by}) is relative; give an absolute path")]
    RelativeConfigPath {
        path: PathBuf,
        chosen_by: PathChoice,
    },

    /// The config file exists (or may exist) but could not be read.
    #[error("cannot read config file {path} ({chosen_by}): {error}")]
    Read {
        path: PathBuf,
        chosen_by: PathChoice,
        #[source]
        error: io::Error,
    },

    /// The text is not valid TOML.
    #[error("{origin}, line {line}, column {column}: malformed TOML: {message}")]
    Syntax {
        origin: ConfigSource,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column (in characters) of the error.
        column: usize,
        message: String,
    },

    /// A top-level table that wisp does not know, e.g. `[hypervisr]`.
    #[error("{origin}: unknown section [{section}]; the sections are {}", brackets(.allowed))]
    UnknownSection {
        origin: ConfigSource,
        section: String,
        allowed: Vec<String>,
    },

    /// A key that its section does not have, e.g. `hypervisor.vcpu`.
    #[error("{origin}: unknown key `{section}.{name}`; [{section}] allows: {}", .allowed.join(", "))]
    UnknownKey {
        origin: ConfigSource,
        section: String,
        name: String,
        allowed: Vec<String>,
    },

    /// A value of the wrong TOML type, e.g. `vcpus = "four"`.
    #[error("{origin}: {key} must be {expected}, found {found}")]
    WrongType {
        origin: ConfigSource,
        key: String,
        expected: String,
        found: String,
    },

    /// A value of the right type that is not allowed (out of range, relative path, ...).
    #[error("{set_by}: {key} = {value} is invalid: {reason}")]
    InvalidValue {
        set_by: SetBy,
        key: String,
        /// The value as it would be written in TOML.
        value: String,
        reason: String,
    },

    /// `runtime.enable_annotations` names something that is not a configuration key.
    #[error(
        "{origin}: runtime.enable_annotations lists {name:?}, which is not a configuration key; \
         keys that may be enabled: {}", .annotatable.join(", ")
    )]
    UnknownEnabledAnnotation {
        origin: ConfigSource,
        name: String,
        annotatable: Vec<String>,
    },

    /// `runtime.enable_annotations` names a key that pods may never override.
    #[error(
        "{origin}: runtime.enable_annotations lists {name:?}, which pods may never override \
         (host paths and runtime.enable_annotations itself are set only by the config file); \
         remove it"
    )]
    ForbiddenEnabledAnnotation { origin: ConfigSource, name: String },

    /// The parsed TOML could not be turned into the typed configuration. The checks
    /// before this step make it unexpected; kept so that nothing panics.
    #[error("{origin}: {message}")]
    Deserialize {
        origin: ConfigSource,
        message: String,
    },

    /// A pod annotation `io.wisp.config.<x>` where `<x>` is no configuration key.
    #[error(
        "annotation {annotation} names no configuration key; keys that may be enabled: {}; \
         enable_annotations allows: {}", .annotatable.join(", "), brackets(.enabled)
    )]
    UnknownAnnotation {
        annotation: String,
        annotatable: Vec<String>,
        enabled: Vec<String>,
    },

    /// A pod annotation for a key that pods may never override, listed or not.
    #[error(
        "annotation {annotation} is refused: {key} can never be set by a pod annotation \
         (host paths and runtime.enable_annotations are set only by the config file)"
    )]
    AnnotationForbidden { annotation: String, key: String },

    /// A pod annotation for a key that the config file did not enable.
    #[error(
        "annotation {annotation} is not enabled; enable_annotations allows: {} \
         (add {key:?} to runtime.enable_annotations in the config file to allow it)",
        brackets(.enabled)
    )]
    AnnotationNotEnabled {
        annotation: String,
        key: String,
        enabled: Vec<String>,
    },

    /// A pod annotation whose value does not parse as the key's type.
    #[error("annotation {annotation}={value:?}: {key} must be {expected}")]
    AnnotationValue {
        annotation: String,
        key: String,
        value: String,
        expected: String,
    },

    /// A host file named by a path key (VMM binary, kernel, initrd) is missing.
    #[error("{set_by}: {key} = {path} cannot be used: {error}")]
    HostFile {
        set_by: SetBy,
        key: String,
        path: PathBuf,
        #[source]
        error: io::Error,
    },
}

/// `[a, b]`, the way lists are shown in messages; `[]` when empty.
fn brackets(items: &[String]) -> String {
    format!("[{}]", items.join(", "))
}
