//! Pod annotation overrides: `io.wisp.config.<section>.<key>` on the sandbox.
//!
//! Annotations come from whoever may create pods, so they are untrusted: only keys
//! that the operator listed in `runtime.enable_annotations` are accepted, keys
//! without a setter in the key table (host paths, `enable_annotations` itself) are
//! refused even if listed, every value goes through the same checks as the file, and
//! a rejected set of annotations leaves the configuration unchanged.

use std::collections::HashMap;

use crate::error::ConfigError;
use crate::keys::{annotatable_keys, Key, ANNOTATION_PREFIX};
use crate::model::Config;

impl Config {
    /// Applies the `io.wisp.config.*` annotations of a pod, then re-validates.
    /// Other annotations are ignored. On error nothing is changed.
    pub fn apply_annotations(
        &mut self,
        annotations: &HashMap<String, String>,
    ) -> Result<(), ConfigError> {
        // Sorted, so that the first error reported does not depend on hash order.
        let mut ours: Vec<(&str, &String, &String)> = annotations
            .iter()
            .filter_map(|(name, value)| {
                name.strip_prefix(ANNOTATION_PREFIX)
                    .map(|id| (id, name, value))
            })
            .collect();
        if ours.is_empty() {
            return Ok(());
        }
        ours.sort_unstable();

        let enabled = &self.runtime.enable_annotations;
        let mut next = self.clone();
        for (id, annotation, value) in ours {
            let Some(key) = Key::find(id) else {
                return Err(ConfigError::UnknownAnnotation {
                    annotation: annotation.clone(),
                    annotatable: annotatable_keys(),
                    enabled: enabled.clone(),
                });
            };
            if !key.annotatable() {
                return Err(ConfigError::AnnotationForbidden {
                    annotation: annotation.clone(),
                    key: key.id(),
                });
            }
            if !enabled.iter().any(|e| e == id) {
                return Err(ConfigError::AnnotationNotEnabled {
                    annotation: annotation.clone(),
                    key: key.id(),
                    enabled: enabled.clone(),
                });
            }
            let value_error = || ConfigError::AnnotationValue {
                annotation: annotation.clone(),
                key: key.id(),
                value: value.clone(),
                expected: key.kind.expected(),
            };
            let setting = key.kind.parse_annotation(value).ok_or_else(value_error)?;
            key.check(&setting, &self.source, Some(annotation))?;
            if !key.set(&mut next, setting) {
                // Unreachable: annotatable() said there is a setter.
                return Err(ConfigError::AnnotationForbidden {
                    annotation: annotation.clone(),
                    key: key.id(),
                });
            }
            next.overrides.insert(key.id(), annotation.clone());
        }
        next.validate()?;
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SetBy;

    fn config_enabling(keys: &[&str]) -> Config {
        let list: Vec<String> = keys.iter().map(|k| format!("{k:?}")).collect();
        Config::from_toml_str(&format!(
            "[runtime]\nenable_annotations = [{}]\n",
            list.join(", ")
        ))
        .expect("valid config")
    }

    fn annotations(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn enabled_annotations_override_the_file() {
        let mut config = config_enabling(&[
            "hypervisor.vcpus",
            "hypervisor.memory_mib",
            "hypervisor.kernel_params",
            "runtime.debug",
            "agent.rpc_timeout_ms",
        ]);
        config
            .apply_annotations(&annotations(&[
                ("io.wisp.config.hypervisor.vcpus", "4"),
                ("io.wisp.config.hypervisor.memory_mib", "1024"),
                ("io.wisp.config.hypervisor.kernel_params", "quiet"),
                ("io.wisp.config.runtime.debug", "true"),
                ("io.wisp.config.agent.rpc_timeout_ms", "5000"),
            ]))
            .expect("all enabled");
        assert_eq!(config.hypervisor.vcpus, 4);
        assert_eq!(config.hypervisor.memory_mib, 1024);
        assert_eq!(config.hypervisor.kernel_params, "quiet");
        assert!(config.runtime.debug);
        assert_eq!(config.agent.rpc_timeout_ms, 5000);
        assert_eq!(
            config
                .annotation_overrides()
                .get("hypervisor.vcpus")
                .map(String::as_str),
            Some("io.wisp.config.hypervisor.vcpus")
        );
        assert_eq!(config.annotation_overrides().len(), 5);
    }

    #[test]
    fn other_annotations_are_ignored() {
        let mut config = Config::default();
        config
            .apply_annotations(&annotations(&[
                ("io.kubernetes.cri.sandbox-id", "abc"),
                ("io.katacontainers.config.hypervisor.default_vcpus", "8"),
                ("io.wisp.configx.hypervisor.vcpus", "8"),
                ("IO.WISP.CONFIG.hypervisor.vcpus", "8"),
            ]))
            .expect("nothing of ours");
        assert_eq!(config, Config::default());
        assert!(config.annotation_overrides().is_empty());
    }

    #[test]
    fn annotation_not_enabled_is_refused_with_the_enabled_list() {
        let mut config = config_enabling(&["hypervisor.vcpus"]);
        let e = config
            .apply_annotations(&annotations(&[(
                "io.wisp.config.hypervisor.memory_mib",
                "512",
            )]))
            .expect_err("not enabled");
        assert!(
            matches!(&e, ConfigError::AnnotationNotEnabled { key, .. } if key == "hypervisor.memory_mib")
        );
        assert_eq!(
            e.to_string(),
            "annotation io.wisp.config.hypervisor.memory_mib is not enabled; enable_annotations \
             allows: [hypervisor.vcpus] (add \"hypervisor.memory_mib\" to \
             runtime.enable_annotations in the config file to allow it)"
        );
        // Nothing enabled at all.
        let e = Config::default()
            .apply_annotations(&annotations(&[("io.wisp.config.hypervisor.vcpus", "2")]))
            .expect_err("nothing enabled");
        assert!(
            e.to_string().contains("enable_annotations allows: []"),
            "{e}"
        );
    }

    #[test]
    fn unknown_wisp_annotation_is_refused() {
        let mut config = config_enabling(&["hypervisor.vcpus"]);
        let e = config
            .apply_annotations(&annotations(&[("io.wisp.config.hypervisor.vcpu", "2")]))
            .expect_err("no such key");
        assert!(matches!(&e, ConfigError::UnknownAnnotation { .. }));
        assert!(
            e.to_string().starts_with(
                "annotation io.wisp.config.hypervisor.vcpu names no configuration key"
            ),
            "{e}"
        );
    }

    #[test]
    fn path_keys_can_never_be_overridden() {
        // Even a config built in code that lists them is refused at the annotation.
        let mut config = Config::default();
        config.runtime.enable_annotations = vec![
            "hypervisor.path".into(),
            "hypervisor.kernel".into(),
            "hypervisor.initrd".into(),
            "runtime.state_dir".into(),
            "runtime.enable_annotations".into(),
            // A pod never turns its own VMM's confinement off.
            "hypervisor.jail".into(),
            "hypervisor.seccomp".into(),
        ];
        for key in &config.runtime.enable_annotations.clone() {
            let name = format!("io.wisp.config.{key}");
            let value = if key.ends_with("jail") || key.ends_with("seccomp") { "false" } else { "/tmp/evil" };
            let e = config
                .apply_annotations(&annotations(&[(&name, value)]))
                .expect_err("forbidden");
            assert!(
                matches!(&e, ConfigError::AnnotationForbidden { key: k, .. } if k == key),
                "{e}"
            );
            assert!(
                e.to_string()
                    .contains("can never be set by a pod annotation"),
                "{e}"
            );
        }
        assert_eq!(config.hypervisor, Config::default().hypervisor);
        assert_eq!(
            config.runtime.state_dir,
            Config::default().runtime.state_dir
        );
    }

    #[test]
    fn a_pod_may_turn_templates_off_when_enabled_and_a_bad_value_says_so() {
        let mut config = config_enabling(&["hypervisor.templates"]);
        assert!(config.hypervisor.templates, "on by default");
        let e = config
            .apply_annotations(&annotations(&[("io.wisp.config.hypervisor.templates", "off")]))
            .expect_err("not a bool");
        assert!(e.to_string().contains("io.wisp.config.hypervisor.templates"), "{e}");
        assert!(config.hypervisor.templates, "a refused annotation changes nothing");
        config
            .apply_annotations(&annotations(&[("io.wisp.config.hypervisor.templates", "false")]))
            .unwrap();
        assert!(!config.hypervisor.templates);
        // Not enabled: refused.
        let mut plain = Config::default();
        assert!(plain
            .apply_annotations(&annotations(&[("io.wisp.config.hypervisor.templates", "false")]))
            .is_err());
        // In the file, a wrong type names the key.
        let e = Config::from_toml_str("[hypervisor]\ntemplates = \"yes\"\n").unwrap_err();
        assert!(e.to_string().contains("templates"), "{e}");
    }

    #[test]
    fn bad_values_are_refused_and_change_nothing() {
        let mut config = config_enabling(&[
            "hypervisor.vcpus",
            "runtime.debug",
            "agent.dial_attempt_timeout_ms",
        ]);
        let before = config.clone();

        let e = config
            .apply_annotations(&annotations(&[("io.wisp.config.hypervisor.vcpus", "four")]))
            .expect_err("not an integer");
        assert_eq!(
            e.to_string(),
            "annotation io.wisp.config.hypervisor.vcpus=\"four\": hypervisor.vcpus must be \
             an integer from 1 to 64"
        );

        let e = config
            .apply_annotations(&annotations(&[("io.wisp.config.hypervisor.vcpus", "128")]))
            .expect_err("out of range");
        assert!(
            matches!(&e, ConfigError::InvalidValue { set_by: SetBy::Annotation(a), key, .. }
            if a == "io.wisp.config.hypervisor.vcpus" && key == "hypervisor.vcpus")
        );
        assert_eq!(
            e.to_string(),
            "annotation io.wisp.config.hypervisor.vcpus: hypervisor.vcpus = 128 is invalid: \
             must be from 1 to 64"
        );

        assert!(matches!(
            config.apply_annotations(&annotations(&[("io.wisp.config.runtime.debug", "yes")])),
            Err(ConfigError::AnnotationValue { .. })
        ));

        // A valid value that breaks a rule between keys, alongside a good one.
        let e = config
            .apply_annotations(&annotations(&[
                ("io.wisp.config.hypervisor.vcpus", "2"),
                ("io.wisp.config.agent.dial_attempt_timeout_ms", "40000"),
            ]))
            .expect_err("attempt longer than the overall deadline");
        assert!(e.to_string().starts_with(
            "annotation io.wisp.config.agent.dial_attempt_timeout_ms: agent.dial_attempt_timeout_ms = 40000"),
            "{e}");

        assert_eq!(
            config, before,
            "a refused set of annotations changes nothing"
        );
        assert!(config.annotation_overrides().is_empty());
    }
}
