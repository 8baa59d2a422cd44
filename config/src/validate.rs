//! `Config::validate`: every key against its bounds in the key table, then the
//! rules that tie keys together.
//!
//! Run after every parse and after annotation overrides, so a `Config` that reached
//! the shim is known good. Errors name the key, the value, what is allowed and where
//! the value came from (file or pod annotation).

use std::fs;
use std::path::Path;

use crate::error::{ConfigError, SetBy};
use crate::keys::{Key, KEYS};
use crate::model::Config;

impl Config {
    /// Checks every value: integer bounds, absolute paths, kernel command-line text,
    /// the names in `runtime.enable_annotations`, and that
    /// `agent.dial_attempt_timeout_ms` does not exceed `agent.dial_timeout_ms`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for key in KEYS {
            key.check(&key.get(self), &self.source, self.annotation_for(key))?;
        }
        if self.agent.dial_attempt_timeout_ms > self.agent.dial_timeout_ms {
            let key = Key::find("agent.dial_attempt_timeout_ms");
            return Err(ConfigError::InvalidValue {
                set_by: self.set_by(key),
                key: "agent.dial_attempt_timeout_ms".to_string(),
                value: self.agent.dial_attempt_timeout_ms.to_string(),
                reason: format!(
                    "must not exceed agent.dial_timeout_ms ({})",
                    self.agent.dial_timeout_ms
                ),
            });
        }
        Ok(())
    }

    /// Checks that the host files the VM needs exist and are regular files:
    /// `hypervisor.path`, `hypervisor.kernel` and `hypervisor.initrd`. Separate from
    /// `validate` because it looks at the host, not at the configuration; the shim
    /// calls it before starting a VM so that a missing asset is named by its key.
    pub fn check_host_files(&self) -> Result<(), ConfigError> {
        let files: [(&str, &Path); 3] = [
            ("hypervisor.path", &self.hypervisor.path),
            ("hypervisor.kernel", &self.hypervisor.kernel),
            ("hypervisor.initrd", &self.hypervisor.initrd),
        ];
        for (key, path) in files {
            let problem = match fs::metadata(path) {
                Ok(meta) if meta.is_file() => continue,
                Ok(_) => std::io::Error::other("it is not a regular file"),
                Err(error) => error,
            };
            return Err(ConfigError::HostFile {
                set_by: self.set_by(Key::find(key)),
                key: key.to_string(),
                path: path.to_path_buf(),
                error: problem,
            });
        }
        Ok(())
    }

    /// The annotation that set `key`, if a pod annotation did.
    fn annotation_for(&self, key: &Key) -> Option<&str> {
        self.overrides.get(&key.id()).map(String::as_str)
    }

    /// Where the current value of `key` came from.
    fn set_by(&self, key: Option<&Key>) -> SetBy {
        match key.and_then(|k| self.annotation_for(k)) {
            Some(annotation) => SetBy::Annotation(annotation.to_string()),
            None => SetBy::Config(self.source.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    #[test]
    fn validate_catches_values_set_in_code() {
        let mut config = Config::default();
        config.hypervisor.vcpus = 0;
        assert!(
            matches!(config.validate(), Err(ConfigError::InvalidValue { key, .. })
            if key == "hypervisor.vcpus")
        );
        let mut config = Config::default();
        config.runtime.state_dir = "relative".into();
        assert!(
            matches!(config.validate(), Err(ConfigError::InvalidValue { key, .. })
            if key == "runtime.state_dir")
        );
        let mut config = Config::default();
        config.agent.dial_timeout_ms = u64::MAX;
        assert!(config.validate().is_err());
    }

    #[test]
    fn host_files_are_checked_by_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vmm = dir.path().join("wisp-vmm");
        let kernel = dir.path().join("vmlinux");
        File::create(&vmm).expect("create");
        File::create(&kernel).expect("create");
        let mut config = Config::default();
        config.hypervisor.path = vmm;
        config.hypervisor.kernel = kernel;
        config.hypervisor.initrd = dir.path().join("initrd.img");
        let e = config.check_host_files().expect_err("initrd is missing");
        assert!(matches!(&e, ConfigError::HostFile { key, .. } if key == "hypervisor.initrd"));
        assert!(
            e.to_string()
                .starts_with("built-in defaults: hypervisor.initrd = "),
            "{e}"
        );

        config.hypervisor.initrd = dir.path().to_path_buf();
        let e = config
            .check_host_files()
            .expect_err("a directory is no initrd");
        assert!(e.to_string().ends_with("it is not a regular file"), "{e}");

        File::create(dir.path().join("initrd.img")).expect("create");
        config.hypervisor.initrd = dir.path().join("initrd.img");
        config.check_host_files().expect("all present");
    }
}
