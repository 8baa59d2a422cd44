//! Turns TOML text into a validated `Config`.
//!
//! The text is operator input and is trusted for nothing. Three steps, each with its
//! own error: TOML syntax (with line and column), then every section and key checked
//! against the key table (unknown names and wrong types named precisely), then serde
//! (`deny_unknown_fields` everywhere, a second guard) and `validate`.

use crate::error::ConfigError;
use crate::keys::{keys_of, Key, SECTIONS};
use crate::model::Config;
use crate::source::ConfigSource;

impl Config {
    /// Parses and validates TOML text. `source()` of the result is
    /// `ConfigSource::Inline`. An empty string gives the defaults.
    pub fn from_toml_str(text: &str) -> Result<Config, ConfigError> {
        parse(text, ConfigSource::Inline)
    }
}

/// Parses `text`, read from `source`, into a validated `Config`.
pub(crate) fn parse(text: &str, source: ConfigSource) -> Result<Config, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let (line, column) = e
            .span()
            .map(|span| line_column(text, span.start))
            .unwrap_or((1, 1));
        ConfigError::Syntax {
            origin: source.clone(),
            line,
            column,
            message: e.message().trim_end().to_string(),
        }
    })?;
    check_keys(&table, &source)?;
    let mut config: Config =
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Deserialize {
                origin: source.clone(),
                message: e.message().trim_end().to_string(),
            })?;
    config.source = source;
    config.validate()?;
    Ok(config)
}

/// Checks every entry of `table` against the key table: known section, known key,
/// right TOML type and, for integers, within bounds (so that serde never meets a
/// value that does not fit the field).
fn check_keys(table: &toml::Table, source: &ConfigSource) -> Result<(), ConfigError> {
    for (section, entries) in table {
        if !SECTIONS.iter().any(|s| s.name == section) {
            return Err(ConfigError::UnknownSection {
                origin: source.clone(),
                section: section.clone(),
                allowed: SECTIONS.iter().map(|s| s.name.to_string()).collect(),
            });
        }
        let Some(entries) = entries.as_table() else {
            return Err(ConfigError::WrongType {
                origin: source.clone(),
                key: section.clone(),
                expected: format!("a table ([{section}])"),
                found: describe(entries),
            });
        };
        for (name, value) in entries {
            let Some(key) = Key::find(&format!("{section}.{name}")) else {
                return Err(ConfigError::UnknownKey {
                    origin: source.clone(),
                    section: section.clone(),
                    name: name.clone(),
                    allowed: keys_of(section),
                });
            };
            let Some(setting) = key.kind.read_toml(value) else {
                return Err(ConfigError::WrongType {
                    origin: source.clone(),
                    key: key.id(),
                    expected: key.kind.expected(),
                    found: describe(value),
                });
            };
            key.check(&setting, source, None)?;
        }
    }
    Ok(())
}

/// "a string (\"four\")": the TOML type of `value` and the value, shortened.
fn describe(value: &toml::Value) -> String {
    const MAX: usize = 60;
    let mut shown = value.to_string();
    if shown.chars().count() > MAX {
        shown = shown.chars().take(MAX).collect::<String>() + "...";
    }
    let article = match value.type_str() {
        "integer" | "array" => "an",
        _ => "a",
    };
    format!("{article} {} ({shown})", value.type_str())
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AgentConfig, HypervisorConfig, RuntimeConfig};

    fn err(text: &str) -> ConfigError {
        match Config::from_toml_str(text) {
            Ok(config) => panic!("expected an error for {text:?}, got {config:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn empty_text_gives_the_defaults() {
        let config = Config::from_toml_str("").expect("empty is valid");
        assert_eq!(config, Config::default());
        assert_eq!(config.source(), &ConfigSource::Inline);
        // Comments and empty sections are just as empty.
        let config = Config::from_toml_str("# nothing\n[hypervisor]\n[agent]\n[runtime]\n")
            .expect("empty sections are valid");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = Config::default();
        assert_eq!(c.hypervisor.path.to_str(), Some("/usr/local/bin/wisp-vmm"));
        assert_eq!(
            c.hypervisor.kernel.to_str(),
            Some("/usr/share/wisp/vmlinux")
        );
        assert_eq!(
            c.hypervisor.initrd.to_str(),
            Some("/usr/share/wisp/initrd.img")
        );
        assert_eq!(c.hypervisor.kernel_params, "");
        assert_eq!(c.hypervisor.vcpus, 1);
        assert_eq!(c.hypervisor.memory_mib, 256);
        assert_eq!(c.hypervisor.memory_bytes(), 256 << 20);
        assert_eq!(c.agent.dial_timeout_ms, 30_000);
        assert_eq!(c.agent.dial_attempt_timeout_ms, 500);
        assert_eq!(c.agent.rpc_timeout_ms, 30_000);
        assert_eq!(c.agent.dial_timeout(), std::time::Duration::from_secs(30));
        assert!(!c.runtime.debug);
        assert_eq!(c.runtime.state_dir.to_str(), Some("/run/wisp"));
        assert!(c.runtime.enable_annotations.is_empty());
        assert_eq!(
            c.runtime.shutdown_grace(),
            std::time::Duration::from_secs(3)
        );
        assert!(c.annotation_overrides().is_empty());
        c.validate().expect("the defaults are valid");
    }

    #[test]
    fn full_file_sets_every_key() {
        let text = r#"
            [hypervisor]
            path = "/opt/wisp/bin/wisp-vmm"
            kernel = "/opt/wisp/vmlinux"
            initrd = "/opt/wisp/initrd.img"
            kernel_params = "quiet loglevel=3"
            vcpus = 4
            memory_mib = 2048
            jail = false
            seccomp = false
            templates = false

            [agent]
            dial_timeout_ms = 20000
            dial_attempt_timeout_ms = 1000
            rpc_timeout_ms = 60000

            [runtime]
            debug = true
            state_dir = "/run/wisp-test"
            enable_annotations = ["hypervisor.vcpus", "hypervisor.memory_mib"]
            shutdown_grace_ms = 0
        "#;
        let config = Config::from_toml_str(text).expect("valid");
        let expected = Config {
            hypervisor: HypervisorConfig {
                path: "/opt/wisp/bin/wisp-vmm".into(),
                kernel: "/opt/wisp/vmlinux".into(),
                initrd: "/opt/wisp/initrd.img".into(),
                kernel_params: "quiet loglevel=3".into(),
                vcpus: 4,
                memory_mib: 2048,
                jail: false,
                seccomp: false,
                templates: false,
            },
            agent: AgentConfig {
                dial_timeout_ms: 20_000,
                dial_attempt_timeout_ms: 1_000,
                rpc_timeout_ms: 60_000,
            },
            runtime: RuntimeConfig {
                debug: true,
                state_dir: "/run/wisp-test".into(),
                enable_annotations: vec!["hypervisor.vcpus".into(), "hypervisor.memory_mib".into()],
                shutdown_grace_ms: 0,
            },
            ..Config::default()
        };
        assert_eq!(config, expected);
    }

    #[test]
    fn partial_sections_keep_the_other_defaults() {
        let config = Config::from_toml_str("[hypervisor]\nvcpus = 2\n").expect("valid");
        assert_eq!(config.hypervisor.vcpus, 2);
        assert_eq!(config.hypervisor.memory_mib, 256);
        assert_eq!(config.agent, AgentConfig::default());
        // Dotted keys and inline tables are the same TOML.
        let config =
            Config::from_toml_str("agent = { rpc_timeout_ms = 1000 }\nruntime.debug = true")
                .expect("valid");
        assert_eq!(config.agent.rpc_timeout_ms, 1000);
        assert!(config.runtime.debug);
    }

    #[test]
    fn malformed_toml_reports_line_and_column() {
        let e = err("[hypervisor]\nvcpus = 2\nmemory_mib = = 3\n");
        match &e {
            ConfigError::Syntax {
                origin,
                line,
                column,
                ..
            } => {
                assert_eq!(origin, &ConfigSource::Inline);
                assert_eq!(*line, 3);
                assert_eq!(*column, 14);
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
        let msg = e.to_string();
        assert!(
            msg.starts_with("inline configuration, line 3, column 14: malformed TOML"),
            "{msg}"
        );

        // An unterminated table header.
        assert!(matches!(
            err("[hypervisor\n"),
            ConfigError::Syntax { line: 1, .. }
        ));
        // A key given twice.
        assert!(matches!(
            err("[agent]\nrpc_timeout_ms = 1000\nrpc_timeout_ms = 2000\n"),
            ConfigError::Syntax { line: 3, .. }
        ));
    }

    #[test]
    fn unknown_section_lists_the_sections() {
        let e = err("[hypervisr]\nvcpus = 2\n");
        assert!(
            matches!(&e, ConfigError::UnknownSection { section, .. } if section == "hypervisr")
        );
        assert_eq!(
            e.to_string(),
            "inline configuration: unknown section [hypervisr]; \
             the sections are [hypervisor, agent, runtime]"
        );
        // A top-level key outside any section is an unknown section too.
        assert!(
            matches!(err("vcpus = 2\n"), ConfigError::UnknownSection { section, .. } if section == "vcpus")
        );
    }

    #[test]
    fn unknown_key_names_it_and_lists_the_section_keys() {
        let e = err("[hypervisor]\nvcpu = 2\n");
        assert_eq!(
            e.to_string(),
            "inline configuration: unknown key `hypervisor.vcpu`; [hypervisor] allows: \
             path, kernel, initrd, kernel_params, vcpus, memory_mib, jail, seccomp, templates"
        );
        let e = err("[runtime]\nenable_debug = true\n");
        assert!(
            matches!(&e, ConfigError::UnknownKey { section, name, allowed, .. }
            if section == "runtime" && name == "enable_debug" && allowed.contains(&"debug".to_string()))
        );
    }

    #[test]
    fn serde_alone_also_refuses_unknown_keys() {
        // deny_unknown_fields guards code that deserializes without `parse`.
        assert!(toml::from_str::<Config>("[hypervisor]\nvcpu = 2\n").is_err());
        assert!(toml::from_str::<Config>("[hypervisr]\n").is_err());
    }

    #[test]
    fn wrong_type_names_the_key_and_what_was_found() {
        let e = err("[hypervisor]\nvcpus = \"four\"\n");
        assert_eq!(
            e.to_string(),
            "inline configuration: hypervisor.vcpus must be an integer from 1 to 64, \
             found a string (\"four\")"
        );
        assert!(matches!(err("[hypervisor]\nmemory_mib = 512.0\n"),
            ConfigError::WrongType { key, .. } if key == "hypervisor.memory_mib"));
        assert!(matches!(err("[runtime]\ndebug = \"yes\"\n"),
            ConfigError::WrongType { key, .. } if key == "runtime.debug"));
        assert!(
            matches!(err("[runtime]\nenable_annotations = \"hypervisor.vcpus\"\n"),
            ConfigError::WrongType { key, .. } if key == "runtime.enable_annotations")
        );
        assert!(matches!(err("[runtime]\nenable_annotations = [1]\n"),
            ConfigError::WrongType { key, .. } if key == "runtime.enable_annotations"));
        assert!(matches!(err("[hypervisor]\nkernel = 3\n"),
            ConfigError::WrongType { key, .. } if key == "hypervisor.kernel"));
        // A section that is not a table.
        let e = err("hypervisor = 3\n");
        assert_eq!(
            e.to_string(),
            "inline configuration: hypervisor must be a table ([hypervisor]), found an integer (3)"
        );
    }

    #[test]
    fn out_of_range_values_name_key_value_and_bounds() {
        let e = err("[hypervisor]\nvcpus = 0\n");
        assert_eq!(
            e.to_string(),
            "inline configuration: hypervisor.vcpus = 0 is invalid: must be from 1 to 64"
        );
        for (text, key) in [
            ("[hypervisor]\nvcpus = 65", "hypervisor.vcpus"),
            ("[hypervisor]\nvcpus = -1", "hypervisor.vcpus"),
            ("[hypervisor]\nmemory_mib = 63", "hypervisor.memory_mib"),
            ("[hypervisor]\nmemory_mib = 65537", "hypervisor.memory_mib"),
            (
                "[hypervisor]\nmemory_mib = 99999999999999",
                "hypervisor.memory_mib",
            ),
            ("[agent]\ndial_timeout_ms = 0", "agent.dial_timeout_ms"),
            (
                "[agent]\ndial_attempt_timeout_ms = 0",
                "agent.dial_attempt_timeout_ms",
            ),
            ("[agent]\nrpc_timeout_ms = 600001", "agent.rpc_timeout_ms"),
            (
                "[runtime]\nshutdown_grace_ms = -5",
                "runtime.shutdown_grace_ms",
            ),
            (
                "[runtime]\nshutdown_grace_ms = 60001",
                "runtime.shutdown_grace_ms",
            ),
        ] {
            match err(text) {
                ConfigError::InvalidValue { key: k, .. } => assert_eq!(k, key, "{text}"),
                other => panic!("{text}: expected an invalid value, got {other:?}"),
            }
        }
        // The bounds themselves are allowed.
        Config::from_toml_str(
            "[hypervisor]\nvcpus = 64\nmemory_mib = 64\n[runtime]\nshutdown_grace_ms = 0",
        )
        .expect("bounds are inclusive");
    }

    #[test]
    fn attempt_timeout_may_not_exceed_overall_dial_timeout() {
        let e = err("[agent]\ndial_timeout_ms = 1000\ndial_attempt_timeout_ms = 2000\n");
        assert_eq!(
            e.to_string(),
            "inline configuration: agent.dial_attempt_timeout_ms = 2000 is invalid: \
             must not exceed agent.dial_timeout_ms (1000)"
        );
    }

    #[test]
    fn relative_and_odd_paths_are_refused() {
        let e = err("[hypervisor]\nkernel = \"vmlinux\"\n");
        assert!(matches!(&e, ConfigError::InvalidValue { key, value, .. }
            if key == "hypervisor.kernel" && value == "\"vmlinux\""));
        assert!(e.to_string().contains("relative path"), "{e}");
        for text in [
            "[hypervisor]\npath = \"./wisp-vmm\"",
            "[hypervisor]\ninitrd = \"\"",
            "[runtime]\nstate_dir = \"run/wisp\"",
            "[runtime]\nstate_dir = \"/run/../tmp\"",
        ] {
            assert!(
                matches!(err(text), ConfigError::InvalidValue { .. }),
                "{text}"
            );
        }
    }

    #[test]
    fn kernel_params_must_be_one_printable_line() {
        assert!(
            matches!(err("[hypervisor]\nkernel_params = \"quiet\\ninit=/bin/sh\""),
            ConfigError::InvalidValue { key, .. } if key == "hypervisor.kernel_params")
        );
        let long = format!("[hypervisor]\nkernel_params = \"{}\"", "a".repeat(1025));
        assert!(matches!(err(&long), ConfigError::InvalidValue { .. }));
    }

    #[test]
    fn enable_annotations_must_name_annotatable_keys() {
        let e = err("[runtime]\nenable_annotations = [\"hypervisor.vcpu\"]\n");
        assert!(
            matches!(&e, ConfigError::UnknownEnabledAnnotation { name, .. } if name == "hypervisor.vcpu")
        );
        let msg = e.to_string();
        assert!(
            msg.contains("hypervisor.vcpus, hypervisor.memory_mib"),
            "{msg}"
        );
        assert!(
            !msg.contains("hypervisor.kernel,"),
            "forbidden keys are not offered: {msg}"
        );

        for forbidden in [
            "hypervisor.path",
            "hypervisor.kernel",
            "hypervisor.initrd",
            "runtime.state_dir",
            "runtime.enable_annotations",
            "hypervisor.jail",
            "hypervisor.seccomp",
        ] {
            let text =
                format!("[runtime]\nenable_annotations = [\"hypervisor.vcpus\", \"{forbidden}\"]");
            assert!(
                matches!(err(&text), ConfigError::ForbiddenEnabledAnnotation { name, .. }
                if name == forbidden),
                "{forbidden}"
            );
        }
        // Bare key names without their section are not keys.
        assert!(matches!(
            err("[runtime]\nenable_annotations = [\"vcpus\"]"),
            ConfigError::UnknownEnabledAnnotation { .. }
        ));
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("abc", 0), (1, 1));
        assert_eq!(line_column("a\nbc", 3), (2, 2));
        assert_eq!(line_column("é\né", 5), (2, 2));
        // An offset inside a character counts from that character's start.
        assert_eq!(line_column("é\né", 4), (2, 1));
        assert_eq!(line_column("ab", 99), (1, 3));
    }
}
