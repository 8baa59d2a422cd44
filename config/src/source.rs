//! Where a configuration comes from, and which file `Config::load` picks.
//!
//! The choice is a pure function of the shim option, the `WISP_CONFIG` value and the
//! default path, so it is tested without touching the process environment. The record
//! of the choice (`ConfigSource`) travels with the `Config` and prefixes its errors.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

/// The default config file, installed by `make install`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/wisp/config.toml";

/// Environment variable that names the config file when the shim option is not set.
pub const CONFIG_ENV: &str = "WISP_CONFIG";

/// Why a config file path was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathChoice {
    /// The shim's runtime option `config_path` (containerd runtime options).
    ShimOption,
    /// The environment variable `WISP_CONFIG`.
    EnvVar,
    /// The default location, `/etc/wisp/config.toml`.
    DefaultLocation,
}

impl PathChoice {
    /// What the operator can do when a file chosen this way does not exist.
    pub(crate) fn missing_hint(self) -> String {
        match self {
            PathChoice::ShimOption => format!(
                "fix config_path in the wisp runtime options of containerd's config, \
                 or remove it to use {DEFAULT_CONFIG_PATH}"
            ),
            PathChoice::EnvVar => {
                format!("fix {CONFIG_ENV} or unset it to use {DEFAULT_CONFIG_PATH}")
            }
            PathChoice::DefaultLocation => {
                "install it (make install) or remove it to use the built-in defaults".to_string()
            }
        }
    }
}

impl fmt::Display for PathChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathChoice::ShimOption => "from the shim option config_path",
            PathChoice::EnvVar => "from WISP_CONFIG",
            PathChoice::DefaultLocation => "the default location",
        })
    }
}

/// Where a `Config` came from. Shown at the start of its error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// Built-in defaults. `absent` is the default config file that was looked for
    /// and did not exist, when the defaults came from `Config::load`.
    Defaults { absent: Option<PathBuf> },
    /// A config file, and why that file was chosen.
    File {
        path: PathBuf,
        chosen_by: PathChoice,
    },
    /// Text given to `Config::from_toml_str`.
    Inline,
}

impl Default for ConfigSource {
    fn default() -> Self {
        ConfigSource::Defaults { absent: None }
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::Defaults { absent: None } => f.write_str("built-in defaults"),
            ConfigSource::Defaults { absent: Some(path) } => {
                write!(f, "built-in defaults ({} does not exist)", path.display())
            }
            ConfigSource::File { path, chosen_by } => {
                write!(f, "config file {} ({chosen_by})", path.display())
            }
            ConfigSource::Inline => f.write_str("inline configuration"),
        }
    }
}

/// Picks the config file: `explicit` (shim option) > `env` (`WISP_CONFIG`) >
/// `default_path`. An empty explicit path or empty env value counts as not set
/// (an unset protobuf string arrives as "").
pub(crate) fn choose_path(
    explicit: Option<&Path>,
    env: Option<OsString>,
    default_path: &Path,
) -> (PathBuf, PathChoice) {
    if let Some(path) = explicit.filter(|p| !p.as_os_str().is_empty()) {
        return (path.to_path_buf(), PathChoice::ShimOption);
    }
    if let Some(value) = env.filter(|v| !v.is_empty()) {
        return (PathBuf::from(value), PathChoice::EnvVar);
    }
    (default_path.to_path_buf(), PathChoice::DefaultLocation)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = "/etc/wisp/config.toml";

    #[test]
    fn explicit_path_wins_over_env_and_default() {
        let chosen = choose_path(
            Some(Path::new("/opt/a.toml")),
            Some("/opt/b.toml".into()),
            Path::new(DEFAULT),
        );
        assert_eq!(
            chosen,
            (PathBuf::from("/opt/a.toml"), PathChoice::ShimOption)
        );
    }

    #[test]
    fn env_wins_over_default() {
        let chosen = choose_path(None, Some("/opt/b.toml".into()), Path::new(DEFAULT));
        assert_eq!(chosen, (PathBuf::from("/opt/b.toml"), PathChoice::EnvVar));
    }

    #[test]
    fn default_when_nothing_else_is_set() {
        let chosen = choose_path(None, None, Path::new(DEFAULT));
        assert_eq!(
            chosen,
            (PathBuf::from(DEFAULT), PathChoice::DefaultLocation)
        );
    }

    #[test]
    fn empty_values_count_as_unset() {
        let chosen = choose_path(Some(Path::new("")), Some("".into()), Path::new(DEFAULT));
        assert_eq!(
            chosen,
            (PathBuf::from(DEFAULT), PathChoice::DefaultLocation)
        );
    }

    #[test]
    fn sources_read_well_in_messages() {
        let file = ConfigSource::File {
            path: "/opt/b.toml".into(),
            chosen_by: PathChoice::EnvVar,
        };
        assert_eq!(
            file.to_string(),
            "config file /opt/b.toml (from WISP_CONFIG)"
        );
        let defaults = ConfigSource::Defaults {
            absent: Some(DEFAULT.into()),
        };
        assert_eq!(
            defaults.to_string(),
            "built-in defaults (/etc/wisp/config.toml does not exist)"
        );
    }
}
