//! The key table: the one place that lists every configuration key with its type,
//! bounds, documentation and whether a pod may override it.
//!
//! Everything that talks about keys reads this table: the unknown-key check of the
//! parser, `validate`, annotation overrides, the Markdown reference and the shipped
//! `config.toml`. So the README, the default file and the error messages cannot
//! drift apart. The table reaches the typed structs through small getter and setter
//! functions; unit tests check that table and structs agree key for key.
//!
//! A key is overridable by annotation exactly when it has a setter. Path keys and
//! `runtime.enable_annotations` have none, so no code path can set them from a pod.

use std::path::{Component, Path, PathBuf};

use crate::error::{ConfigError, SetBy};
use crate::model::Config;
use crate::source::ConfigSource;

/// Prefix of the pod annotations that override configuration keys:
/// `io.wisp.config.<section>.<key>`.
pub const ANNOTATION_PREFIX: &str = "io.wisp.config.";

/// A section (`[hypervisor]`) and what it is for.
#[derive(Debug)]
pub struct Section {
    pub name: &'static str,
    pub doc: &'static str,
}

/// The sections, in file order.
pub static SECTIONS: &[Section] = &[
    Section {
        name: "hypervisor",
        doc: "How each pod's micro-VM is built: the VMM binary, the guest kernel and \
              initrd, and the VM's size.",
    },
    Section {
        name: "agent",
        doc: "How the shim reaches wisp-agent inside the VM. Every step has a deadline, \
              so a dead VM turns into an error, never a hang.",
    },
    Section {
        name: "runtime",
        doc: "The shim's own behaviour: state directory, debugging, pod overrides and \
              shutdown.",
    },
];

/// The type of a key's value and what values are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `true` or `false`.
    Bool,
    /// An integer within `min..=max`.
    Integer { min: i64, max: i64 },
    /// An absolute path without `..` components.
    AbsolutePath,
    /// Kernel command-line text: printable ASCII, at most `max_len` bytes.
    CommandLine { max_len: usize },
    /// A list of key names (`section.key`) that pods may override.
    AnnotationKeys,
}

/// One configuration key.
#[derive(Debug)]
pub struct Key {
    /// Section name, e.g. `hypervisor`.
    pub section: &'static str,
    /// Key name within the section, e.g. `vcpus`.
    pub name: &'static str,
    /// Type and allowed values.
    pub kind: Kind,
    /// What the key does, for the reference and the default config file.
    pub doc: &'static str,
    get: fn(&Config) -> Setting,
    set: Option<fn(&mut Config, Setting)>,
}

/// A key's value, independent of the field type it is stored in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Setting {
    Bool(bool),
    Integer(i64),
    Path(PathBuf),
    Text(String),
    Keys(Vec<String>),
}

/// Every configuration key, in file order.
pub static KEYS: &[Key] = &[
    Key {
        section: "hypervisor",
        name: "path",
        kind: Kind::AbsolutePath,
        doc: "The wisp-vmm binary that runs each pod's VM.",
        get: |c| Setting::Path(c.hypervisor.path.clone()),
        set: None,
    },
    Key {
        section: "hypervisor",
        name: "kernel",
        kind: Kind::AbsolutePath,
        doc: "Guest kernel: an uncompressed vmlinux (ELF, PVH entry when present) or a \
              bzImage, built from wisp's kernel config (make guest).",
        get: |c| Setting::Path(c.hypervisor.kernel.clone()),
        set: None,
    },
    Key {
        section: "hypervisor",
        name: "initrd",
        kind: Kind::AbsolutePath,
        doc: "Guest initrd; holds wisp-agent as /init and nothing else the containers \
              need (they bring their own rootfs).",
        get: |c| Setting::Path(c.hypervisor.initrd.clone()),
        set: None,
    },
    Key {
        section: "hypervisor",
        name: "kernel_params",
        kind: Kind::CommandLine { max_len: 1024 },
        doc: "Extra guest kernel command-line parameters, appended after the ones wisp \
              sets itself (console, virtio-mmio devices). Empty adds nothing.",
        get: |c| Setting::Text(c.hypervisor.kernel_params.clone()),
        set: Some(|c, s| {
            if let Setting::Text(v) = s {
                c.hypervisor.kernel_params = v;
            }
        }),
    },
    Key {
        section: "hypervisor",
        name: "vcpus",
        kind: Kind::Integer { min: 1, max: 64 },
        doc: "Virtual CPUs of each pod VM.",
        get: |c| Setting::Integer(c.hypervisor.vcpus.into()),
        set: Some(|c, s| {
            if let Setting::Integer(v) = s {
                c.hypervisor.vcpus = saturating_u32(v);
            }
        }),
    },
    Key {
        section: "hypervisor",
        name: "memory_mib",
        kind: Kind::Integer {
            min: 64,
            max: 65_536,
        },
        doc: "Guest memory of each pod VM, in MiB. Below 64 MiB the guest kernel and \
              agent do not boot; the upper bound (64 GiB) catches values given in the \
              wrong unit.",
        get: |c| Setting::Integer(c.hypervisor.memory_mib.into()),
        set: Some(|c, s| {
            if let Setting::Integer(v) = s {
                c.hypervisor.memory_mib = saturating_u32(v);
            }
        }),
    },
    Key {
        section: "hypervisor",
        name: "jail",
        kind: Kind::Bool,
        doc: "Confine each pod's wisp-vmm: PID 1 of its own PID namespace, new mount, IPC, \
              UTS and network namespaces, pivot_root into a jail that holds only its kernel, \
              initrd, sockets and share, 7 capabilities, no_new_privs. Turn it off only to \
              debug: the shim then logs a warning for every pod it starts. Never a pod \
              override.",
        get: |c| Setting::Bool(c.hypervisor.jail),
        set: None,
    },
    Key {
        section: "hypervisor",
        name: "seccomp",
        kind: Kind::Bool,
        doc: "Give each wisp-vmm thread its own seccomp allow-list (vCPU, device and \
              control threads); a call outside it kills the VMM and the pod's tasks \
              exit. Turn it off only to debug: the shim then logs a warning for every pod \
              it starts. Never a pod override.",
        get: |c| Setting::Bool(c.hypervisor.seccomp),
        set: None,
    },
    Key {
        section: "hypervisor",
        name: "templates",
        kind: Kind::Bool,
        doc: "Start each pod's VM by restoring a template: a VM of the same shape (kernel, \
              initrd, wisp-vmm, vCPUs, memory, kernel parameters, NICs, debug console) \
              booted once until its agent answered, kept under state_dir/templates. The \
              first pod of a shape boots cold and makes it; pods restored from it start \
              without a boot and share its unchanged guest memory in the page cache. Each \
              restored guest gets fresh host entropy, the clock, its hostname, MAC and \
              addresses after the restore; it shares the template's kernel memory layout and \
              the kernel secrets drawn while it booted with the others (see the README). A \
              template that cannot be made or restored means a cold boot, with a warning.",
        get: |c| Setting::Bool(c.hypervisor.templates),
        set: Some(|c, s| {
            if let Setting::Bool(v) = s {
                c.hypervisor.templates = v;
            }
        }),
    },
    Key {
        section: "agent",
        name: "dial_timeout_ms",
        kind: Kind::Integer {
            min: 100,
            max: 300_000,
        },
        doc: "Overall deadline, in milliseconds from VM start, to reach wisp-agent over \
              vsock and get an answer to a health check. When it passes, the pod fails \
              to start and its VM is stopped.",
        get: |c| Setting::Integer(saturating_i64(c.agent.dial_timeout_ms)),
        set: Some(|c, s| {
            if let Setting::Integer(v) = s {
                c.agent.dial_timeout_ms = saturating_u64(v);
            }
        }),
    },
    Key {
        section: "agent",
        name: "dial_attempt_timeout_ms",
        kind: Kind::Integer {
            min: 10,
            max: 60_000,
        },
        doc: "Deadline of one connection attempt to the agent, in milliseconds; the \
              shim retries until agent.dial_timeout_ms has passed. Must not exceed \
              agent.dial_timeout_ms.",
        get: |c| Setting::Integer(saturating_i64(c.agent.dial_attempt_timeout_ms)),
        set: Some(|c, s| {
            if let Setting::Integer(v) = s {
                c.agent.dial_attempt_timeout_ms = saturating_u64(v);
            }
        }),
    },
    Key {
        section: "agent",
        name: "rpc_timeout_ms",
        kind: Kind::Integer {
            min: 100,
            max: 600_000,
        },
        doc: "Deadline of each agent request that should answer promptly (create, \
              start, signal, stats, ...), in milliseconds. Waiting for a process to \
              exit has no deadline.",
        get: |c| Setting::Integer(saturating_i64(c.agent.rpc_timeout_ms)),
        set: Some(|c, s| {
            if let Setting::Integer(v) = s {
                c.agent.rpc_timeout_ms = saturating_u64(v);
            }
        }),
    },
    Key {
        section: "runtime",
        name: "debug",
        kind: Kind::Bool,
        doc: "Write the guest serial console to console.log in the sandbox's state \
              directory (<state_dir>/<sandbox-id>/vmm/console.log). When false the console \
              device is off.",
        get: |c| Setting::Bool(c.runtime.debug),
        set: Some(|c, s| {
            if let Setting::Bool(v) = s {
                c.runtime.debug = v;
            }
        }),
    },
    Key {
        section: "runtime",
        name: "state_dir",
        kind: Kind::AbsolutePath,
        doc: "Root of the per-sandbox state: <state_dir>/<sandbox-id>/ holds the \
              sockets, the shared directory and the console log. Use a tmpfs, so that \
              a reboot clears it.",
        get: |c| Setting::Path(c.runtime.state_dir.clone()),
        set: None,
    },
    Key {
        section: "runtime",
        name: "enable_annotations",
        kind: Kind::AnnotationKeys,
        doc: "Keys that a pod may override with the annotation io.wisp.config.<key>, \
              for example \"hypervisor.memory_mib\". Empty: pods override nothing. \
              Path keys and enable_annotations itself can never be listed.",
        get: |c| Setting::Keys(c.runtime.enable_annotations.clone()),
        set: None,
    },
    Key {
        section: "runtime",
        name: "shutdown_grace_ms",
        kind: Kind::Integer {
            min: 0,
            max: 60_000,
        },
        doc: "How long, in milliseconds, the guest gets to power off after the shim \
              asked it to, before wisp-vmm is killed. 0 kills at once.",
        get: |c| Setting::Integer(saturating_i64(c.runtime.shutdown_grace_ms)),
        set: Some(|c, s| {
            if let Setting::Integer(v) = s {
                c.runtime.shutdown_grace_ms = saturating_u64(v);
            }
        }),
    },
];

/// Range checks run before a setter, so saturation never changes a value that passed.
fn saturating_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

fn saturating_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Names of the keys of `section`, in file order.
pub(crate) fn keys_of(section: &str) -> Vec<String> {
    KEYS.iter()
        .filter(|k| k.section == section)
        .map(|k| k.name.to_string())
        .collect()
}

/// `section.key` names of the keys that pods may override (when enabled).
pub fn annotatable_keys() -> Vec<String> {
    KEYS.iter()
        .filter(|k| k.annotatable())
        .map(Key::id)
        .collect()
}

impl Key {
    /// The key with this `section.key` name.
    pub fn find(id: &str) -> Option<&'static Key> {
        let (section, name) = id.split_once('.')?;
        KEYS.iter().find(|k| k.section == section && k.name == name)
    }

    /// `section.key`, e.g. `hypervisor.vcpus`.
    pub fn id(&self) -> String {
        format!("{}.{}", self.section, self.name)
    }

    /// The pod annotation for this key, e.g. `io.wisp.config.hypervisor.vcpus`.
    pub fn annotation(&self) -> String {
        format!("{ANNOTATION_PREFIX}{}", self.id())
    }

    /// Whether a pod may override this key (when `runtime.enable_annotations` lists it).
    pub fn annotatable(&self) -> bool {
        self.set.is_some()
    }

    /// The key's default value, written as TOML (`256`, `"/run/wisp"`, `[]`).
    pub fn default_toml(&self) -> String {
        (self.get)(&Config::default()).to_toml().to_string()
    }

    pub(crate) fn get(&self, config: &Config) -> Setting {
        (self.get)(config)
    }

    /// Stores `setting`; `false` (and nothing stored) for a key pods may not set.
    pub(crate) fn set(&self, config: &mut Config, setting: Setting) -> bool {
        match self.set {
            Some(set) => {
                set(config, setting);
                true
            }
            None => false,
        }
    }

    /// Checks one value of this key. `annotation` names the pod annotation that set
    /// it, if any; otherwise the value came from `source`.
    pub(crate) fn check(
        &self,
        setting: &Setting,
        source: &ConfigSource,
        annotation: Option<&str>,
    ) -> Result<(), ConfigError> {
        let invalid = |reason: String| ConfigError::InvalidValue {
            set_by: match annotation {
                Some(name) => SetBy::Annotation(name.to_string()),
                None => SetBy::Config(source.clone()),
            },
            key: self.id(),
            value: setting.to_toml().to_string(),
            reason,
        };
        match (self.kind, setting) {
            (Kind::Integer { min, max }, Setting::Integer(v)) if *v < min || *v > max => {
                return Err(invalid(format!("must be from {min} to {max}")));
            }
            (Kind::AbsolutePath, Setting::Path(p)) => {
                if let Some(reason) = path_problem(p) {
                    return Err(invalid(reason));
                }
            }
            (Kind::CommandLine { max_len }, Setting::Text(s)) => {
                if s.len() > max_len {
                    return Err(invalid(format!(
                        "it is {} bytes long; at most {max_len} are allowed",
                        s.len()
                    )));
                }
                if let Some(c) = s.chars().find(|c| !(' '..='~').contains(c)) {
                    return Err(invalid(format!(
                        "it contains the character {c:?}; only printable ASCII and spaces \
                         are allowed"
                    )));
                }
            }
            (Kind::AnnotationKeys, Setting::Keys(names)) => {
                for name in names {
                    match Key::find(name) {
                        None => {
                            return Err(ConfigError::UnknownEnabledAnnotation {
                                origin: source.clone(),
                                name: name.clone(),
                                annotatable: annotatable_keys(),
                            })
                        }
                        Some(key) if !key.annotatable() => {
                            return Err(ConfigError::ForbiddenEnabledAnnotation {
                                origin: source.clone(),
                                name: name.clone(),
                            })
                        }
                        Some(_) => {}
                    }
                }
            }
            // In-range integers and all bools pass; a kind/setting mismatch cannot
            // come out of the table (unit-tested) and has nothing to check.
            _ => {}
        }
        Ok(())
    }
}

/// Why `path` is not acceptable for a path key, if it is not.
fn path_problem(path: &Path) -> Option<String> {
    if path.as_os_str().is_empty() {
        Some("it is empty; give an absolute path".to_string())
    } else if !path.is_absolute() {
        Some(
            "it is a relative path; give an absolute path (the shim's working directory \
             is not one you choose)"
                .to_string(),
        )
    } else if path.components().any(|c| c == Component::ParentDir) {
        Some("it contains `..`; give the path without it".to_string())
    } else {
        None
    }
}

impl Kind {
    /// What a value must be, as a phrase: "an integer from 1 to 64".
    pub fn expected(&self) -> String {
        match self {
            Kind::Bool => "true or false".to_string(),
            Kind::Integer { min, max } => format!("an integer from {min} to {max}"),
            Kind::AbsolutePath => "an absolute path (a string)".to_string(),
            Kind::CommandLine { max_len } => {
                format!("a string of printable ASCII, at most {max_len} bytes")
            }
            Kind::AnnotationKeys => {
                "a list of key names (strings) such as \"hypervisor.vcpus\"".to_string()
            }
        }
    }

    /// The type's name in the reference: `integer`, `path`, ...
    pub fn type_name(&self) -> &'static str {
        match self {
            Kind::Bool => "bool",
            Kind::Integer { .. } => "integer",
            Kind::AbsolutePath => "path",
            Kind::CommandLine { .. } => "string",
            Kind::AnnotationKeys => "list of strings",
        }
    }

    /// The allowed values, short, for the reference and config comments.
    pub fn allowed(&self) -> String {
        match self {
            Kind::Bool => "true or false".to_string(),
            Kind::Integer { min, max } => format!("{min} to {max}"),
            Kind::AbsolutePath => "absolute path, no `..`".to_string(),
            Kind::CommandLine { max_len } => format!("printable ASCII, at most {max_len} bytes"),
            Kind::AnnotationKeys => format!("any of {}", annotatable_keys().join(", ")),
        }
    }

    /// The value of a TOML entry, if it has this kind's type. Bounds are not checked.
    pub(crate) fn read_toml(&self, value: &toml::Value) -> Option<Setting> {
        match (self, value) {
            (Kind::Bool, toml::Value::Boolean(b)) => Some(Setting::Bool(*b)),
            (Kind::Integer { .. }, toml::Value::Integer(i)) => Some(Setting::Integer(*i)),
            (Kind::AbsolutePath, toml::Value::String(s)) => Some(Setting::Path(s.into())),
            (Kind::CommandLine { .. }, toml::Value::String(s)) => Some(Setting::Text(s.clone())),
            (Kind::AnnotationKeys, toml::Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .map(Setting::Keys),
            _ => None,
        }
    }

    /// The value of a pod annotation, if it parses as this kind. Bounds are not
    /// checked. Kinds that pods may never set do not parse.
    pub(crate) fn parse_annotation(&self, value: &str) -> Option<Setting> {
        match self {
            Kind::Bool => match value {
                "true" => Some(Setting::Bool(true)),
                "false" => Some(Setting::Bool(false)),
                _ => None,
            },
            Kind::Integer { .. } => value.parse().ok().map(Setting::Integer),
            Kind::CommandLine { .. } => Some(Setting::Text(value.to_string())),
            Kind::AbsolutePath | Kind::AnnotationKeys => None,
        }
    }
}

impl Setting {
    pub(crate) fn to_toml(&self) -> toml::Value {
        match self {
            Setting::Bool(b) => toml::Value::Boolean(*b),
            Setting::Integer(i) => toml::Value::Integer(*i),
            Setting::Path(p) => toml::Value::String(p.to_string_lossy().into_owned()),
            Setting::Text(s) => toml::Value::String(s.clone()),
            Setting::Keys(names) => {
                toml::Value::Array(names.iter().cloned().map(toml::Value::String).collect())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_belongs_to_a_known_section_and_is_unique() {
        for (i, key) in KEYS.iter().enumerate() {
            assert!(
                SECTIONS.iter().any(|s| s.name == key.section),
                "{} is in no section",
                key.id()
            );
            assert!(
                KEYS[..i].iter().all(|other| other.id() != key.id()),
                "{} is listed twice",
                key.id()
            );
        }
    }

    #[test]
    fn table_matches_the_structs_key_for_key() {
        // Serializing the defaults lists exactly the struct fields, by section.
        let serialized = toml::Value::try_from(Config::default()).expect("defaults serialize");
        let tables = serialized.as_table().expect("a table");
        let sections: Vec<&str> = tables.keys().map(String::as_str).collect();
        let mut expected_sections: Vec<&str> = SECTIONS.iter().map(|s| s.name).collect();
        expected_sections.sort_unstable();
        let mut got_sections = sections.clone();
        got_sections.sort_unstable();
        assert_eq!(got_sections, expected_sections);
        for (section, fields) in tables {
            let fields = fields.as_table().expect("a section table");
            let mut names: Vec<String> = fields.keys().cloned().collect();
            names.sort();
            let mut listed = keys_of(section);
            listed.sort();
            assert_eq!(
                names, listed,
                "[{section}] fields differ from the key table"
            );
            for (name, value) in fields {
                let key = Key::find(&format!("{section}.{name}")).expect("listed");
                // The getter reads the right field, and the kind matches its type.
                assert_eq!(
                    &key.get(&Config::default()).to_toml(),
                    value,
                    "{}",
                    key.id()
                );
                assert!(key.kind.read_toml(value).is_some(), "{} kind", key.id());
            }
        }
    }

    #[test]
    fn setters_write_the_field_their_getter_reads() {
        for key in KEYS.iter().filter(|k| k.annotatable()) {
            let value = match key.kind {
                Kind::Bool => Setting::Bool(true),
                Kind::Integer { max, .. } => Setting::Integer(max),
                Kind::CommandLine { .. } => Setting::Text("quiet".into()),
                other => panic!("{} is annotatable with kind {other:?}", key.id()),
            };
            let mut config = Config::default();
            assert!(key.set(&mut config, value.clone()));
            assert_eq!(key.get(&config), value, "{}", key.id());
        }
    }

    #[test]
    fn path_keys_and_enable_annotations_are_never_annotatable() {
        for key in KEYS {
            if matches!(key.kind, Kind::AbsolutePath | Kind::AnnotationKeys) {
                assert!(!key.annotatable(), "{} must not be annotatable", key.id());
                assert!(!key.set(&mut Config::default(), Setting::Bool(true)));
            }
        }
        assert!(!Key::find("runtime.enable_annotations")
            .expect("key")
            .annotatable());
    }

    #[test]
    fn find_needs_the_exact_dotted_name() {
        assert_eq!(
            Key::find("hypervisor.vcpus").map(Key::id).as_deref(),
            Some("hypervisor.vcpus")
        );
        assert!(Key::find("vcpus").is_none());
        assert!(Key::find("hypervisor.vcpu").is_none());
        assert!(Key::find("Hypervisor.vcpus").is_none());
    }

    #[test]
    fn annotation_values_parse_per_kind() {
        assert_eq!(
            Kind::Bool.parse_annotation("true"),
            Some(Setting::Bool(true))
        );
        assert_eq!(Kind::Bool.parse_annotation("yes"), None);
        let int = Kind::Integer { min: 1, max: 2 };
        assert_eq!(int.parse_annotation("-3"), Some(Setting::Integer(-3)));
        assert_eq!(int.parse_annotation("2 "), None);
        assert_eq!(Kind::AbsolutePath.parse_annotation("/x"), None);
        assert_eq!(Kind::AnnotationKeys.parse_annotation("[]"), None);
    }
}
