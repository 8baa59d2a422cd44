//! `Config::load`: find the config file, read it, parse it.
//!
//! Order: the shim option `config_path` > `WISP_CONFIG` > `/etc/wisp/config.toml` >
//! built-in defaults. Only the default location may be missing; a file the operator
//! named explicitly must exist, and a default file that exists but cannot be read is
//! an error, never a silent fall-back to defaults.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::Path;

use crate::error::ConfigError;
use crate::model::Config;
use crate::parse::parse;
use crate::source::{choose_path, ConfigSource, PathChoice, CONFIG_ENV, DEFAULT_CONFIG_PATH};

impl Config {
    /// Loads the configuration. `explicit` is the shim's runtime option `config_path`
    /// (`None` or empty when not set). See the module documentation for the order.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        load_from(
            explicit,
            std::env::var_os(CONFIG_ENV),
            Path::new(DEFAULT_CONFIG_PATH),
        )
    }
}

/// `Config::load` with the environment value and default path passed in.
pub(crate) fn load_from(
    explicit: Option<&Path>,
    env: Option<OsString>,
    default_path: &Path,
) -> Result<Config, ConfigError> {
    let (path, chosen_by) = choose_path(explicit, env, default_path);
    if chosen_by != PathChoice::DefaultLocation && !path.is_absolute() {
        return Err(ConfigError::RelativeConfigPath { path, chosen_by });
    }
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if chosen_by == PathChoice::DefaultLocation {
                return Ok(Config {
                    source: ConfigSource::Defaults { absent: Some(path) },
                    ..Config::default()
                });
            }
            return Err(ConfigError::NotFound { path, chosen_by });
        }
        Err(error) => {
            return Err(ConfigError::Read {
                path,
                chosen_by,
                error,
            })
        }
    };
    parse(&text, ConfigSource::File { path, chosen_by })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Mutex;

    /// Serializes the tests that change the process environment.
    static ENV_LOCK: Mutex<()> = Mutex::new(());

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).expect("write config");
        path
    }

    #[test]
    fn explicit_path_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "c.toml", "[hypervisor]\nvcpus = 3\n");
        let default = write(dir.path(), "default.toml", "[hypervisor]\nvcpus = 5\n");
        let config =
            load_from(Some(&path), Some(OsString::from("/nope.toml")), &default).expect("loads");
        assert_eq!(config.hypervisor.vcpus, 3);
        assert_eq!(
            config.source(),
            &ConfigSource::File {
                path,
                chosen_by: PathChoice::ShimOption
            }
        );
    }

    #[test]
    fn env_path_is_read_when_no_explicit_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "c.toml", "[agent]\nrpc_timeout_ms = 1234\n");
        let default = write(dir.path(), "default.toml", "");
        let config = load_from(None, Some(path.clone().into_os_string()), &default).expect("loads");
        assert_eq!(config.agent.rpc_timeout_ms, 1234);
        assert_eq!(
            config.source(),
            &ConfigSource::File {
                path,
                chosen_by: PathChoice::EnvVar
            }
        );
    }

    #[test]
    fn default_file_is_read_when_present() {
        let dir = tempfile::tempdir().expect("tempdir");
        let default = write(dir.path(), "config.toml", "[runtime]\ndebug = true\n");
        let config = load_from(None, None, &default).expect("loads");
        assert!(config.runtime.debug);
        assert!(matches!(
            config.source(),
            ConfigSource::File {
                chosen_by: PathChoice::DefaultLocation,
                ..
            }
        ));
    }

    #[test]
    fn missing_default_file_means_builtin_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let default = dir.path().join("config.toml");
        let config = load_from(None, None, &default).expect("defaults");
        assert_eq!(config, Config::default());
        assert_eq!(
            config.source(),
            &ConfigSource::Defaults {
                absent: Some(default)
            }
        );
    }

    #[test]
    fn missing_explicit_or_env_file_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.toml");
        let default = write(dir.path(), "config.toml", "");

        let e = load_from(Some(&missing), None, &default).expect_err("explicit must exist");
        assert!(matches!(
            &e,
            ConfigError::NotFound {
                chosen_by: PathChoice::ShimOption,
                ..
            }
        ));
        let msg = e.to_string();
        assert!(
            msg.contains(&format!(
                "config file {} (from the shim option config_path) does not exist",
                missing.display()
            )),
            "{msg}"
        );

        let e = load_from(None, Some(missing.clone().into_os_string()), &default)
            .expect_err("env must exist");
        assert!(matches!(
            &e,
            ConfigError::NotFound {
                chosen_by: PathChoice::EnvVar,
                ..
            }
        ));
        assert!(e.to_string().contains("fix WISP_CONFIG or unset it"), "{e}");
    }

    #[test]
    fn relative_config_path_is_refused() {
        let e = load_from(
            Some(Path::new("wisp.toml")),
            None,
            Path::new("/nonexistent"),
        )
        .expect_err("relative");
        assert!(matches!(
            e,
            ConfigError::RelativeConfigPath {
                chosen_by: PathChoice::ShimOption,
                ..
            }
        ));
    }

    #[test]
    fn unreadable_default_location_is_an_error_not_defaults() {
        // A directory where the file should be: exists, cannot be read as a file.
        let dir = tempfile::tempdir().expect("tempdir");
        let e = load_from(None, None, dir.path()).expect_err("a directory is no config file");
        assert!(matches!(
            e,
            ConfigError::Read {
                chosen_by: PathChoice::DefaultLocation,
                ..
            }
        ));
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(
            dir.path(),
            "c.toml",
            "[hypervisor]\nvcpus = 2\nmemory_mb = 512\n",
        );
        let e = load_from(Some(&path), None, Path::new("/nonexistent")).expect_err("unknown key");
        assert_eq!(
            e.to_string(),
            format!(
                "config file {} (from the shim option config_path): unknown key \
                 `hypervisor.memory_mb`; [hypervisor] allows: path, kernel, initrd, \
                 kernel_params, vcpus, memory_mib, jail, seccomp, templates",
                path.display()
            )
        );
        let path = write(dir.path(), "bad.toml", "[agent]\nrpc_timeout_ms = \n");
        let e = load_from(Some(&path), None, Path::new("/nonexistent")).expect_err("syntax");
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("config file {} (from the shim option config_path), line 2, column 18: malformed TOML", path.display())), "{msg}");
    }

    #[test]
    fn load_reads_wisp_config_from_the_environment() {
        let _guard = ENV_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let dir = tempfile::tempdir().expect("tempdir");
        let path = write(dir.path(), "env.toml", "[hypervisor]\nmemory_mib = 512\n");
        let explicit = write(
            dir.path(),
            "explicit.toml",
            "[hypervisor]\nmemory_mib = 1024\n",
        );

        std::env::set_var(CONFIG_ENV, &path);
        let from_env = Config::load(None);
        let from_explicit = Config::load(Some(&explicit));
        std::env::set_var(CONFIG_ENV, dir.path().join("missing.toml"));
        let missing = Config::load(None);
        std::env::remove_var(CONFIG_ENV);

        let from_env = from_env.expect("loads from WISP_CONFIG");
        assert_eq!(from_env.hypervisor.memory_mib, 512);
        assert!(matches!(
            from_env.source(),
            ConfigSource::File {
                chosen_by: PathChoice::EnvVar,
                ..
            }
        ));
        assert_eq!(
            from_explicit.expect("explicit wins").hypervisor.memory_mib,
            1024
        );
        assert!(matches!(
            missing,
            Err(ConfigError::NotFound {
                chosen_by: PathChoice::EnvVar,
                ..
            })
        ));
    }
}
