//! The typed configuration: one struct per TOML section, with the defaults.
//!
//! These structs are what the shim reads. They trust nothing by themselves: a value
//! is only known good after `Config::validate` (which `load`, `from_toml_str` and
//! `apply_annotations` run). The documentation of each key, its bounds and whether a
//! pod may override it live in the key table (`keys.rs`), not here.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::source::ConfigSource;

/// wisp's configuration: `/etc/wisp/config.toml` and pod annotation overrides.
///
/// Two configs are equal when their settings are; where they came from is not compared.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[hypervisor]`: the VMM, guest kernel and initrd, VM size.
    pub hypervisor: HypervisorConfig,
    /// `[agent]`: how the shim reaches wisp-agent in the guest.
    pub agent: AgentConfig,
    /// `[runtime]`: the shim's own behaviour.
    pub runtime: RuntimeConfig,
    /// Where the file-level settings came from.
    #[serde(skip)]
    pub(crate) source: ConfigSource,
    /// Keys set by pod annotations (`hypervisor.vcpus`) -> the annotation that set each.
    #[serde(skip)]
    pub(crate) overrides: BTreeMap<String, String>,
}

impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        self.hypervisor == other.hypervisor
            && self.agent == other.agent
            && self.runtime == other.runtime
    }
}

impl Eq for Config {}

impl Config {
    /// Where this configuration came from (file and why it was chosen, inline text,
    /// or built-in defaults).
    pub fn source(&self) -> &ConfigSource {
        &self.source
    }

    /// Keys that pod annotations have overridden (`hypervisor.vcpus`), each with the
    /// annotation that set it. Empty until `apply_annotations` changed something.
    pub fn annotation_overrides(&self) -> &BTreeMap<String, String> {
        &self.overrides
    }
}

/// `[hypervisor]`: how each pod's micro-VM is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HypervisorConfig {
    /// The `wisp-vmm` binary.
    pub path: PathBuf,
    /// Guest kernel (`vmlinux` ELF or bzImage).
    pub kernel: PathBuf,
    /// Guest initrd holding `wisp-agent` as `/init`.
    pub initrd: PathBuf,
    /// Extra guest kernel command-line parameters, appended after wisp's own.
    pub kernel_params: String,
    /// Virtual CPUs per pod VM.
    pub vcpus: u32,
    /// Guest memory per pod VM, in MiB.
    pub memory_mib: u32,
    /// Confine each wisp-vmm (namespaces, jail, capabilities); off only for debugging.
    pub jail: bool,
    /// Per-thread seccomp filters in each wisp-vmm; off only for debugging.
    pub seccomp: bool,
    /// Start pods by restoring a booted VM template of their VM's shape (the shim's
    /// `template.rs`), with a cold boot as the fallback.
    pub templates: bool,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        HypervisorConfig {
            path: PathBuf::from("/usr/local/bin/wisp-vmm"),
            kernel: PathBuf::from("/usr/share/wisp/vmlinux"),
            initrd: PathBuf::from("/usr/share/wisp/initrd.img"),
            kernel_params: String::new(),
            vcpus: 1,
            memory_mib: 256,
            jail: true,
            seccomp: true,
            templates: true,
        }
    }
}

impl HypervisorConfig {
    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }
}

/// `[agent]`: deadlines for talking to wisp-agent inside the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Overall deadline to reach the agent after the VM started, in ms.
    pub dial_timeout_ms: u64,
    /// Deadline of one connection attempt, in ms.
    pub dial_attempt_timeout_ms: u64,
    /// Deadline of each prompt agent request, in ms.
    pub rpc_timeout_ms: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            dial_timeout_ms: 30_000,
            dial_attempt_timeout_ms: 500,
            rpc_timeout_ms: 30_000,
        }
    }
}

impl AgentConfig {
    /// `dial_timeout_ms` as a `Duration`.
    pub fn dial_timeout(&self) -> Duration {
        Duration::from_millis(self.dial_timeout_ms)
    }

    /// `dial_attempt_timeout_ms` as a `Duration`.
    pub fn dial_attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.dial_attempt_timeout_ms)
    }

    /// `rpc_timeout_ms` as a `Duration`.
    pub fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.rpc_timeout_ms)
    }
}

/// `[runtime]`: the shim's own behaviour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Write the guest console to `<state_dir>/<sandbox-id>/vmm/console.log`.
    pub debug: bool,
    /// Root of the per-sandbox state directories.
    pub state_dir: PathBuf,
    /// Keys (`section.key`) that pods may override with `io.wisp.config.<key>`.
    pub enable_annotations: Vec<String>,
    /// Time the guest gets to power off before wisp-vmm is killed, in ms.
    pub shutdown_grace_ms: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            debug: false,
            state_dir: PathBuf::from("/run/wisp"),
            enable_annotations: Vec::new(),
            shutdown_grace_ms: 3_000,
        }
    }
}

impl RuntimeConfig {
    /// `shutdown_grace_ms` as a `Duration`.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}
