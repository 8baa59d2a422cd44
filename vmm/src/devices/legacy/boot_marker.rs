//! The boot marker port: wisp's guest agent writes a byte to `BOOT_MARKER_PORT` at
//! milestones (userspace started, agent ready). The VMM timestamps them, which gives
//! a boot timeline without a console. Any other value is recorded as a custom mark.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::devices::bus::BusDevice;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Milestone {
    ProcessStart,
    /// A restore: the state file read and checked, the memory file mapped.
    SnapshotOpened,
    /// The KVM VM exists with its guest memory (a restore: and its irqchip, PIT and
    /// clock state).
    KvmReady,
    /// Every device built (a restore: with its saved state).
    DevicesReady,
    /// A boot: kernel, initrd and boot parameters in guest memory, vCPUs configured.
    KernelLoaded,
    /// A restore: every vCPU's saved state loaded.
    VcpuStateLoaded,
    VcpusStarted,
    /// Written by the guest's init as its first act.
    GuestUserspace,
    /// Written by the agent once it listens for the host.
    AgentReady,
    GuestMark(u8),
}

impl Milestone {
    pub fn name(&self) -> String {
        match self {
            Milestone::ProcessStart => "process_start".into(),
            Milestone::SnapshotOpened => "snapshot_opened".into(),
            Milestone::KvmReady => "kvm_ready".into(),
            Milestone::DevicesReady => "devices_ready".into(),
            Milestone::KernelLoaded => "kernel_loaded".into(),
            Milestone::VcpuStateLoaded => "vcpu_state_loaded".into(),
            Milestone::VcpusStarted => "vcpus_started".into(),
            Milestone::GuestUserspace => "guest_userspace".into(),
            Milestone::AgentReady => "agent_ready".into(),
            Milestone::GuestMark(v) => format!("guest_mark_{v}"),
        }
    }

    fn from_guest(value: u8) -> Self {
        match value {
            1 => Milestone::GuestUserspace,
            2 => Milestone::AgentReady,
            v => Milestone::GuestMark(v),
        }
    }
}

/// Milestones with their time since the process started. The guest can write the port
/// as often as it likes: only the first 64 marks are kept.
#[derive(Clone)]
pub struct BootTimeline {
    start: Instant,
    marks: Arc<Mutex<Vec<(Milestone, Duration)>>>,
}

const MAX_MARKS: usize = 64;

impl BootTimeline {
    pub fn new(start: Instant) -> Self {
        let t = Self { start, marks: Arc::new(Mutex::new(Vec::new())) };
        t.record(Milestone::ProcessStart);
        t
    }

    pub fn record(&self, m: Milestone) {
        let at = self.start.elapsed();
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        if marks.len() < MAX_MARKS {
            log::info!("boot timeline: {} at {:.3} ms", m.name(), at.as_secs_f64() * 1e3);
            marks.push((m, at));
        }
    }

    pub fn marks(&self) -> Vec<(Milestone, Duration)> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub struct BootMarker {
    timeline: BootTimeline,
}

impl BootMarker {
    pub fn new(timeline: BootTimeline) -> Self {
        Self { timeline }
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(v) = data.first() {
            self.timeline.record(Milestone::from_guest(*v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_guest_marks_in_order_and_caps_them() {
        let t = BootTimeline::new(Instant::now());
        let mut m = BootMarker::new(t.clone());
        m.write(0, &[1]);
        m.write(0, &[2]);
        m.write(0, &[]);
        let names: Vec<_> = t.marks().iter().map(|(m, _)| m.name()).collect();
        assert_eq!(names, ["process_start", "guest_userspace", "agent_ready"]);
        for _ in 0..200 {
            m.write(0, &[9]);
        }
        assert_eq!(t.marks().len(), MAX_MARKS);
    }
}
