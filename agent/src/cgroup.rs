//! A container's cgroup as the agent uses it after creation: freeze/thaw, pids,
//! resource updates, OOM kill counter, statistics, removal. Creation is libcontainer's.
//!
//! The guest runs cgroup v2 only. cgroup v1/hybrid is supported for the host test mode
//! (hosts that still boot v1), through libcgroups' v1 manager.
//!
//! Trusts: the kernel's cgroup files. Paths come from the spec (validated in `spec`).

use std::path::{Path, PathBuf};

use libcgroups::common::{
    create_cgroup_manager, AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt, FreezerState,
};
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use wisp_protocols::agent::StatsContainerResponse;

use crate::stats;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup {path}: {msg}")]
    Manager { path: String, msg: String },
    #[error(transparent)]
    Stats(#[from] stats::StatsError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// cgroup v2 at /sys/fs/cgroup (the guest).
    Unified,
    /// cgroup v1 controllers (legacy or hybrid hosts).
    Legacy,
}

impl CgroupMode {
    pub fn detect() -> Self {
        match libcgroups::common::get_cgroup_setup() {
            Ok(libcgroups::common::CgroupSetup::Unified) => Self::Unified,
            _ => Self::Legacy,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ContainerCgroup {
    /// Absolute cgroup path, e.g. /wisp/<container id>.
    pub path: PathBuf,
    pub mode: CgroupMode,
    container_id: String,
}

impl ContainerCgroup {
    pub fn new(path: PathBuf, mode: CgroupMode, container_id: &str) -> Self {
        Self { path, mode, container_id: container_id.into() }
    }

    fn err(&self, msg: impl std::fmt::Display) -> CgroupError {
        CgroupError::Manager { path: self.path.display().to_string(), msg: msg.to_string() }
    }

    fn manager(&self) -> Result<AnyCgroupManager, CgroupError> {
        create_cgroup_manager(CgroupConfig {
            cgroup_path: self.path.clone(),
            systemd_cgroup: false,
            container_name: self.container_id.clone(),
        })
        .map_err(|e| self.err(e))
    }

    /// The directory holding the memory controller's files.
    fn memory_dir(&self) -> PathBuf {
        let rel = self.path.strip_prefix("/").unwrap_or(&self.path);
        match self.mode {
            CgroupMode::Unified => Path::new(CGROUP_ROOT).join(rel),
            CgroupMode::Legacy => Path::new(CGROUP_ROOT).join("memory").join(rel),
        }
    }

    pub fn exists(&self) -> bool {
        self.memory_dir().is_dir()
    }

    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        let state = if frozen { FreezerState::Frozen } else { FreezerState::Thawed };
        self.manager()?.freeze(state).map_err(|e| self.err(format!("freezer: {e}")))
    }

    pub fn pids(&self) -> Result<Vec<Pid>, CgroupError> {
        if !self.exists() {
            return Ok(Vec::new());
        }
        self.manager()?.get_all_pids().map_err(|e| self.err(format!("listing processes: {e}")))
    }

    pub fn update(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        let opt = ControllerOpt { resources, disable_oom_killer: false, oom_score_adj: None, freezer_state: None };
        self.manager()?.apply(&opt).map_err(|e| self.err(format!("updating resources: {e}")))
    }

    /// How many processes the kernel's OOM killer has killed in this cgroup.
    pub fn oom_kills(&self) -> Option<u64> {
        let dir = self.memory_dir();
        let (file, key) = match self.mode {
            CgroupMode::Unified => ("memory.events", "oom_kill"),
            CgroupMode::Legacy => ("memory.oom_control", "oom_kill"),
        };
        let text = std::fs::read_to_string(dir.join(file)).ok()?;
        stats::parse_flat_keyed(&text).get(key).copied()
    }

    pub fn stats(&self) -> Result<StatsContainerResponse, CgroupError> {
        match self.mode {
            CgroupMode::Unified => Ok(stats::read_v2(&self.memory_dir())?),
            CgroupMode::Legacy => {
                if !self.exists() {
                    return Err(stats::StatsError::NoCgroup(self.path.display().to_string()).into());
                }
                let s = self.manager()?.stats().map_err(|e| self.err(format!("statistics: {e}")))?;
                Ok(stats::from_libcgroups(&s, self.oom_kills().unwrap_or(0)))
            }
        }
    }

    /// Kills what is left and removes the cgroup (libcgroups retries rmdir a little).
    pub fn remove(&self) -> Result<(), CgroupError> {
        if !self.exists() {
            return Ok(());
        }
        let _ = self.freeze(false);
        self.manager()?.remove().map_err(|e| self.err(format!("removing: {e}")))
    }
}
