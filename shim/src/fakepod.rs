//! A fake pod for the task logic's unit tests (`sandbox/tests.rs`): a guest that does
//! what it is told, records each call, fails the calls a test names, lets a test end a
//! process or the whole VM, and reports which containers' mounts were dropped.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use wisp_protocols::agent::StatsContainerResponse;
use wisp_protocols::exit::ExitCell;

use crate::io::StdioPaths;
use crate::pod::{Boot, GuestPod, HostMounts, NewContainer, OnVmExit, PodEngine, ProcessStdio, TaskError};

type Key = (String, String);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Boots `FakePod`s; `fail_boot` makes the next boot fail, `hold_boot` makes the next
/// boot wait until the test lets it go on.
#[derive(Default)]
pub struct FakeEngine {
    pub pods: Mutex<Vec<Arc<FakePod>>>,
    pub fail_boot: AtomicBool,
    fail_next: Mutex<Vec<&'static str>>,
    gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl FakeEngine {
    /// The next pod booted fails its calls named `name`.
    pub fn fail_in_next_pod(&self, name: &'static str) {
        lock(&self.fail_next).push(name);
    }

    /// The next boot blocks until the returned sender sends (or is dropped).
    pub fn hold_boot(&self) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        *lock(&self.gate) = Some(rx);
        tx
    }

    /// The pod booted last.
    pub fn pod(&self) -> Arc<FakePod> {
        lock(&self.pods).last().cloned().expect("no pod was booted")
    }
}

impl PodEngine for FakeEngine {
    fn boot(&self, boot: Boot<'_>, on_exit: OnVmExit) -> Result<Arc<dyn GuestPod>, TaskError> {
        let gate = lock(&self.gate).take();
        if let Some(gate) = gate {
            let _ = gate.recv();
        }
        if self.fail_boot.swap(false, Ordering::SeqCst) {
            return Err(TaskError::Internal(format!("fake: booting {} failed", boot.sandbox_id)));
        }
        let pod = Arc::new(FakePod { on_exit: Mutex::new(Some(on_exit)), ..Default::default() });
        for name in lock(&self.fail_next).drain(..) {
            pod.fail(name);
        }
        lock(&self.pods).push(pod.clone());
        Ok(pod)
    }
}

#[derive(Default)]
pub struct FakePod {
    calls: Mutex<Vec<String>>,
    failing: Mutex<HashSet<&'static str>>,
    /// Each process's exit: Some(status), or None when the guest is gone.
    exits: Mutex<HashMap<Key, Arc<ExitCell<Option<u32>>>>>,
    started: Mutex<HashSet<Key>>,
    next_pid: AtomicU32,
    on_exit: Mutex<Option<OnVmExit>>,
    /// Containers whose mounts were dropped, in order.
    pub unmounted: Arc<Mutex<Vec<String>>>,
    /// Processes whose stdin was closed.
    pub stdin_closed: Arc<Mutex<Vec<Key>>>,
    oom: (Mutex<VecDeque<Option<String>>>, Condvar),
    /// Set by `hold_shutdown`: shutdown waits on it.
    shutdown_gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl FakePod {
    /// The calls made so far, as "name cid/eid".
    pub fn calls(&self) -> Vec<String> {
        lock(&self.calls).clone()
    }

    /// The next shutdown blocks (a slow VM teardown) until the returned sender sends
    /// (or is dropped).
    pub fn hold_shutdown(&self) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        *lock(&self.shutdown_gate) = Some(rx);
        tx
    }

    /// Makes every later call named `name` fail with an Internal error.
    pub fn fail(&self, name: &'static str) {
        lock(&self.failing).insert(name);
    }

    fn call(&self, name: &'static str, cid: &str, eid: &str) -> Result<(), TaskError> {
        lock(&self.calls).push(format!("{name} {cid}/{eid}"));
        if lock(&self.failing).contains(name) {
            return Err(TaskError::Internal(format!("fake: {name} failed")));
        }
        Ok(())
    }

    fn cell(&self, cid: &str, eid: &str) -> Arc<ExitCell<Option<u32>>> {
        lock(&self.exits).entry((cid.into(), eid.into())).or_default().clone()
    }

    fn start(&self, cid: &str, eid: &str) -> u32 {
        lock(&self.started).insert((cid.into(), eid.into()));
        100 + self.next_pid.fetch_add(1, Ordering::SeqCst)
    }

    /// The process exits in the guest with `status`.
    pub fn exit(&self, cid: &str, eid: &str, status: u32) {
        self.cell(cid, eid).set(Some(status));
    }

    /// The guest reports an OOM kill naming `cid`.
    pub fn oom(&self, cid: &str) {
        lock(&self.oom.0).push_back(Some(cid.into()));
        self.oom.1.notify_all();
    }

    /// The guest connection breaks: every wait and the OOM poll end.
    fn disconnect(&self) {
        for cell in lock(&self.exits).values() {
            cell.set(None);
        }
        lock(&self.oom.0).push_back(None);
        self.oom.1.notify_all();
    }

    /// The VM ends by itself (a guest panic, a crashed VMM).
    pub fn die(&self, why: &str) {
        self.disconnect();
        if let Some(on_exit) = lock(&self.on_exit).take() {
            on_exit(why.into());
        }
    }
}

struct FakeMounts {
    cid: String,
    unmounted: Arc<Mutex<Vec<String>>>,
}

impl HostMounts for FakeMounts {}

impl Drop for FakeMounts {
    fn drop(&mut self) {
        lock(&self.unmounted).push(self.cid.clone());
    }
}

struct FakeStdio {
    key: Key,
    closed: Arc<Mutex<Vec<Key>>>,
}

impl ProcessStdio for FakeStdio {
    fn close_stdin(&mut self) {
        lock(&self.closed).push(self.key.clone());
    }

    fn wait_output(&mut self, _timeout: Duration) -> bool {
        true
    }
}

impl GuestPod for FakePod {
    fn mount_container(&self, c: &NewContainer<'_>) -> Result<(Box<dyn HostMounts>, Vec<u8>), TaskError> {
        self.call("mount", c.id, "")?;
        Ok((Box::new(FakeMounts { cid: c.id.into(), unmounted: self.unmounted.clone() }), b"{}".to_vec()))
    }

    fn create_container(&self, c: &NewContainer<'_>, _guest_spec: Vec<u8>) -> Result<(), TaskError> {
        self.call("create", c.id, "")
    }

    fn attach_stdio(&self, cid: &str, eid: &str, _stdio: &StdioPaths) -> Result<Box<dyn ProcessStdio>, TaskError> {
        self.call("attach", cid, eid)?;
        Ok(Box::new(FakeStdio { key: (cid.into(), eid.into()), closed: self.stdin_closed.clone() }))
    }

    fn remove_container(&self, cid: &str) -> Result<(), TaskError> {
        self.call("remove", cid, "")
    }

    fn start_container(&self, cid: &str) -> Result<u32, TaskError> {
        self.call("start", cid, "")?;
        Ok(self.start(cid, ""))
    }

    fn exec_process(&self, cid: &str, eid: &str, _json: &[u8], _stdio: &StdioPaths) -> Result<u32, TaskError> {
        self.call("exec", cid, eid)?;
        Ok(self.start(cid, eid))
    }

    fn wait_process(&self, cid: &str, eid: &str) -> Option<u32> {
        self.cell(cid, eid).wait()
    }

    /// Any signal ends a started process with 128 + the signal, as the default action would.
    fn signal_process(&self, cid: &str, eid: &str, signal: u32, _all: bool) -> Result<(), TaskError> {
        self.call("signal", cid, eid)?;
        if !lock(&self.started).contains(&(cid.to_string(), eid.to_string())) {
            return Err(TaskError::NotFound(format!("fake: no process {cid}/{eid}")));
        }
        self.exit(cid, eid, 128 + signal);
        Ok(())
    }

    fn pause_container(&self, cid: &str) -> Result<(), TaskError> {
        self.call("pause", cid, "")
    }

    fn resume_container(&self, cid: &str) -> Result<(), TaskError> {
        self.call("resume", cid, "")
    }

    fn list_processes(&self, cid: &str) -> Result<Vec<u32>, TaskError> {
        self.call("pids", cid, "")?;
        Ok(vec![1])
    }

    fn stats_container(&self, cid: &str) -> Result<StatsContainerResponse, TaskError> {
        self.call("stats", cid, "")?;
        Ok(StatsContainerResponse::default())
    }

    fn update_container(&self, cid: &str, _resources_json: Vec<u8>) -> Result<(), TaskError> {
        self.call("update", cid, "")
    }

    fn resize_pty(&self, cid: &str, eid: &str, _width: u32, _height: u32) -> Result<(), TaskError> {
        self.call("resize", cid, eid)
    }

    fn next_oom_event(&self) -> Option<String> {
        let mut q = lock(&self.oom.0);
        loop {
            if let Some(ev) = q.pop_front() {
                if ev.is_none() {
                    // Keep the end for any other poller.
                    q.push_front(None);
                }
                return ev;
            }
            q = self.oom.1.wait(q).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn shutdown(&self) {
        lock(&self.calls).push("shutdown".into());
        let gate = lock(&self.shutdown_gate).take();
        if let Some(gate) = gate {
            let _ = gate.recv();
        }
        self.disconnect();
    }
}
