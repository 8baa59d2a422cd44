//! How a pod's VM comes up to its agent's answer: booted cold, restored from its shape's
//! template, or booted cold to make that template first (`template.rs`). A template
//! that cannot be made or restored costs a cold boot and a warning, never the pod.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wisp_config::Config;

use crate::agent::Agent;
use crate::pod::{internal, TaskError};
use crate::template::{template_mac, Maker, Plan, Shape, Template, Templates, MEMORY_FILE, STATE_FILE};
use crate::vm::{NetDevice, SandboxPaths, VmImage, VmmProcess};
use crate::vmpod::console_tail;

/// How long a restored guest's agent may take to answer before the pod boots cold
/// instead (it answers in a fraction of a second; a boot's deadline is much longer).
const RESTORE_AGENT_DEADLINE: Duration = Duration::from_secs(10);
/// How long the template maker retries a snapshot the guest's closing vsock connection
/// still blocks.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(10);

/// The MACs the VM's NICs were given, when they are a template's: the pod's MAC of each
/// NIC to the template's.
#[derive(Debug, Default)]
pub struct NicMacs(Vec<(String, String)>);

impl NicMacs {
    /// The MAC the NIC of the pod's interface with MAC `pod_mac` has in the guest, if
    /// it is not `pod_mac`.
    pub fn device_mac(&self, pod_mac: &str) -> Option<String> {
        self.0.iter().find(|(p, _)| p == pod_mac).map(|(_, t)| t.clone())
    }
}

/// The VMM started last (stopped by the caller if the boot fails), and whether it was
/// given up on: its end is then not the pod's.
pub type VmSlot = Option<(Arc<VmmProcess>, Arc<AtomicBool>)>;

/// What starting the pod's VM needs.
pub struct VmStart<'a> {
    pub config: &'a Config,
    pub paths: &'a SandboxPaths,
    pub devices: &'a [NetDevice<'a>],
    pub cgroups_path: Option<&'a str>,
    pub sandbox_id: &'a str,
    /// The pod's VM-ended callback: goes to the VMM that the pod keeps, never to one
    /// given up on (a failed restore).
    pub on_exit: Arc<Mutex<Option<Box<dyn FnOnce(String) + Send>>>>,
}

impl VmStart<'_> {
    /// Starts the VM and connects to its agent; the VMM is in `b` (which the caller
    /// stops if the boot fails). Returns the MACs its NICs have if they are a template's.
    pub fn run(&self, b: &mut VmSlot) -> Result<(Arc<VmmProcess>, Agent, NicMacs), TaskError> {
        let id = self.sandbox_id;
        if !self.config.hypervisor.templates {
            return self.cold(b, false);
        }
        let mtus: Vec<u32> = self.devices.iter().map(|d| d.mtu).collect();
        let plan = Templates::open(&self.config.runtime.state_dir)
            .and_then(|t| Shape::of(self.config, &mtus).map(|shape| (t.plan(&shape), t)));
        match plan {
            Ok((Plan::Restore(template), templates)) => match self.restore(b, &template) {
                Ok(started) => Ok(started),
                Err(e) => {
                    log::warn!("sandbox {id}: restoring template {} failed: {e}; booting cold", template.key);
                    templates.discard(&template);
                    self.cold(b, false)
                }
            },
            Ok((Plan::Make(maker), templates)) => self.make(b, &templates, maker),
            Ok((Plan::Cold(why), _)) => {
                log::info!("sandbox {id}: booting cold: {why}");
                self.cold(b, false)
            }
            Err(e) => {
                log::warn!("sandbox {id}: VM templates: {e}; booting cold");
                self.cold(b, false)
            }
        }
    }

    /// A cold boot, with the template's MACs if it is to become the template.
    fn cold(&self, b: &mut VmSlot, template_macs: bool) -> Result<(Arc<VmmProcess>, Agent, NicMacs), TaskError> {
        let a = &self.config.agent;
        let (vm, agent, macs) = self.start(b, VmImage::Boot, template_macs, a.dial_timeout())?;
        let agent = agent.map_err(|e| {
            if let Some(tail) = console_tail(self.paths) {
                log::warn!("sandbox {}: the agent never answered; last guest console lines:\n{tail}", self.sandbox_id);
            }
            internal(format!("starting the pod's VM: {e}"))
        })?;
        Ok((vm, agent, macs))
    }

    /// A restore of `template`; on failure its VMM is stopped and given up on.
    fn restore(&self, b: &mut VmSlot, t: &Template) -> Result<(Arc<VmmProcess>, Agent, NicMacs), String> {
        let began = Instant::now();
        let image = VmImage::Restore { state: &t.state, memory: &t.memory };
        let deadline = self.config.agent.dial_timeout().min(RESTORE_AGENT_DEADLINE);
        let (vm, agent, macs) = self.start(b, image, true, deadline).map_err(|e| e.to_string())?;
        match agent {
            Ok(agent) => {
                log::info!(
                    "sandbox {}: restored template {}; the agent answered after {} ms",
                    self.sandbox_id,
                    t.key,
                    began.elapsed().as_millis()
                );
                Ok((vm, agent, macs))
            }
            Err(e) => {
                self.give_up(b);
                Err(e.to_string())
            }
        }
    }

    /// A cold boot that becomes the template of its shape, then goes on as the pod.
    fn make(
        &self,
        b: &mut VmSlot,
        templates: &Templates,
        maker: Maker,
    ) -> Result<(Arc<VmmProcess>, Agent, NicMacs), TaskError> {
        let id = self.sandbox_id;
        let (vm, agent, macs) = self.cold(b, true)?;
        // A snapshot carries no vsock connection: ours goes first.
        drop(agent);
        let began = Instant::now();
        let vmm_dir = self.paths.vmm_dir();
        let made = vm
            .snapshot(&vmm_dir.join(STATE_FILE), &vmm_dir.join(MEMORY_FILE), SNAPSHOT_DEADLINE)
            .map_err(|e| e.to_string())
            .and_then(|()| templates.install(maker, &vmm_dir).map_err(|e| e.to_string()));
        match made {
            Ok(t) => log::info!("sandbox {id}: made template {} in {} ms", t.key, began.elapsed().as_millis()),
            Err(e) => {
                log::warn!("sandbox {id}: making the VM template failed: {e}; the pod goes on without it");
                for name in [STATE_FILE, MEMORY_FILE] {
                    let _ = std::fs::remove_file(vmm_dir.join(name));
                }
            }
        }
        let a = &self.config.agent;
        let vm_gone = || vm.exited();
        match Agent::connect(&self.paths.vsock(), a.dial_attempt_timeout(), a.dial_timeout(), a.rpc_timeout(), &vm_gone)
        {
            Ok(agent) => Ok((vm, agent, macs)),
            Err(e) => {
                log::warn!(
                    "sandbox {id}: the agent did not answer again after the template was taken: {e}; booting cold"
                );
                self.give_up(b);
                self.cold(b, false)
            }
        }
    }

    /// Starts a VMM from `image` and dials its agent until `deadline`. The VMM is in `b`
    /// whatever the agent did.
    fn start(
        &self,
        b: &mut VmSlot,
        image: VmImage<'_>,
        template_macs: bool,
        deadline: Duration,
    ) -> Result<(Arc<VmmProcess>, Result<Agent, crate::agent::AgentError>, NicMacs), TaskError> {
        let mut macs = NicMacs::default();
        let devices: Vec<NetDevice<'_>> = self
            .devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mac = if template_macs {
                    macs.0.push((d.mac.clone(), template_mac(i)));
                    template_mac(i)
                } else {
                    d.mac.clone()
                };
                NetDevice { tap: d.tap, mac, mtu: d.mtu }
            })
            .collect();
        let abandoned = Arc::new(AtomicBool::new(false));
        let on_exit = {
            let (hook, abandoned) = (self.on_exit.clone(), abandoned.clone());
            Box::new(move |why: String| {
                if abandoned.load(Ordering::Acquire) {
                    return;
                }
                if let Some(f) = hook.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    f(why);
                }
            })
        };
        let vm = VmmProcess::start(self.config, image, self.paths, &devices, self.cgroups_path, on_exit);
        let vm = Arc::new(vm.map_err(internal)?);
        *b = Some((vm.clone(), abandoned));
        let a = &self.config.agent;
        let vm_gone = || vm.exited();
        let agent = Agent::connect(&self.paths.vsock(), a.dial_attempt_timeout(), deadline, a.rpc_timeout(), &vm_gone);
        Ok((vm, agent, macs))
    }

    /// Stops the VMM in `b` as one the pod does not keep: its end is not the pod's.
    fn give_up(&self, b: &mut VmSlot) {
        if let Some((vm, abandoned)) = b.take() {
            abandoned.store(true, Ordering::Release);
            vm.stop(Duration::ZERO);
        }
    }
}
