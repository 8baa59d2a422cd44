//! The ttrpc `Agent` service: translates requests to `Sandbox` calls and errors to
//! ttrpc status codes. Every call runs under `catch_unwind`, so a bug hit by one
//! request answers INTERNAL instead of taking the agent (PID 1) down. Long polls
//! (WaitProcess, GetOomEvent) give up when the caller's connection goes away or its
//! deadline passes, so abandoned calls do not pin threads forever.
//!
//! Trusts: nothing; the `Sandbox` validates.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use ttrpc::{Code, TtrpcContext};
use wisp_protocols::agent::*;
use wisp_protocols::agent_ttrpc::Agent;
use wisp_protocols::AGENT_API_VERSION;

use crate::sandbox::{ErrorClass, Sandbox, SandboxError};

pub struct AgentService {
    sandbox: Arc<Sandbox>,
    /// Called after DestroySandbox has answered: ends the VM or the host-mode agent.
    after_destroy: Arc<dyn Fn() + Send + Sync>,
}

fn code(c: ErrorClass) -> Code {
    match c {
        ErrorClass::InvalidArgument => Code::INVALID_ARGUMENT,
        ErrorClass::NotFound => Code::NOT_FOUND,
        ErrorClass::AlreadyExists => Code::ALREADY_EXISTS,
        ErrorClass::FailedPrecondition => Code::FAILED_PRECONDITION,
        ErrorClass::DeadlineExceeded => Code::DEADLINE_EXCEEDED,
        ErrorClass::Cancelled => Code::CANCELLED,
        ErrorClass::Internal => Code::INTERNAL,
    }
}

/// A closure telling whether the caller is gone (connection closed or deadline past).
fn cancel_probe(ctx: &TtrpcContext) -> impl Fn() -> bool + '_ {
    let deadline = (ctx.timeout_nano > 0).then(|| Instant::now() + Duration::from_nanos(ctx.timeout_nano as u64));
    move || {
        let gone = matches!(ctx.cancel_rx.try_recv(), Err(e) if e.is_disconnected());
        gone || deadline.is_some_and(|d| Instant::now() > d)
    }
}

impl AgentService {
    pub fn new(sandbox: Arc<Sandbox>, after_destroy: Arc<dyn Fn() + Send + Sync>) -> Self {
        Self { sandbox, after_destroy }
    }

    fn call<T>(&self, method: &str, f: impl FnOnce() -> Result<T, SandboxError>) -> ttrpc::Result<T> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                let c = code(e.class());
                if c != Code::CANCELLED {
                    log::warn!("{method}: {e}");
                }
                Err(ttrpc::Error::RpcStatus(ttrpc::get_status(c, e.to_string())))
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                log::error!("{method}: internal error (panic: {msg}); the agent keeps running");
                Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                    Code::INTERNAL,
                    format!("{method}: internal agent error: {msg}"),
                )))
            }
        }
    }
}

impl Agent for AgentService {
    fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        Ok(CheckResponse {
            api_version: AGENT_API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: self.sandbox.uptime().as_millis() as u64,
            ..Default::default()
        })
    }

    fn guest_details(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<GuestDetailsResponse> {
        self.call("GuestDetails", || Ok(self.sandbox.guest_details()))
    }

    fn create_sandbox(&self, _ctx: &TtrpcContext, req: CreateSandboxRequest) -> ttrpc::Result<Empty> {
        self.call("CreateSandbox", || self.sandbox.create_sandbox(&req).map(|_| Empty::new()))
    }

    fn destroy_sandbox(&self, _ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<Empty> {
        self.call("DestroySandbox", || {
            self.sandbox.destroy();
            let after = self.after_destroy.clone();
            // Answer first; end a moment later.
            let _ = std::thread::Builder::new().name("destroy".into()).spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                after();
            });
            Ok(Empty::new())
        })
    }

    fn create_container(&self, _ctx: &TtrpcContext, req: CreateContainerRequest) -> ttrpc::Result<Empty> {
        self.call("CreateContainer", || self.sandbox.create_container(&req).map(|_| Empty::new()))
    }

    fn start_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<StartProcessResponse> {
        self.call("StartContainer", || {
            let pid = self.sandbox.start_container(&req.container_id)?;
            Ok(StartProcessResponse { pid, ..Default::default() })
        })
    }

    fn remove_container(&self, _ctx: &TtrpcContext, req: RemoveContainerRequest) -> ttrpc::Result<Empty> {
        self.call("RemoveContainer", || {
            self.sandbox
                .remove_container(&req.container_id, Duration::from_millis(req.timeout_ms as u64))
                .map(|_| Empty::new())
        })
    }

    fn pause_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.call("PauseContainer", || self.sandbox.pause_container(&req.container_id).map(|_| Empty::new()))
    }

    fn resume_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<Empty> {
        self.call("ResumeContainer", || self.sandbox.resume_container(&req.container_id).map(|_| Empty::new()))
    }

    fn update_container(&self, _ctx: &TtrpcContext, req: UpdateContainerRequest) -> ttrpc::Result<Empty> {
        self.call("UpdateContainer", || self.sandbox.update_container(&req).map(|_| Empty::new()))
    }

    fn stats_container(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<StatsContainerResponse> {
        self.call("StatsContainer", || self.sandbox.stats_container(&req.container_id))
    }

    fn list_processes(&self, _ctx: &TtrpcContext, req: ContainerRequest) -> ttrpc::Result<ListProcessesResponse> {
        self.call("ListProcesses", || {
            Ok(ListProcessesResponse { pids: self.sandbox.list_processes(&req.container_id)?, ..Default::default() })
        })
    }

    fn exec_process(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<StartProcessResponse> {
        self.call("ExecProcess", || {
            let pid = self.sandbox.exec_process(&req)?;
            Ok(StartProcessResponse { pid, ..Default::default() })
        })
    }

    fn signal_process(&self, _ctx: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        self.call("SignalProcess", || self.sandbox.signal_process(&req).map(|_| Empty::new()))
    }

    fn wait_process(&self, ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<WaitProcessResponse> {
        let cancelled = cancel_probe(ctx);
        self.call("WaitProcess", || {
            let st = self.sandbox.wait_process(&req.container_id, &req.exec_id, &cancelled)?;
            let at = st.at.duration_since(UNIX_EPOCH).unwrap_or_default();
            Ok(WaitProcessResponse {
                exit_status: st.status,
                exited_at_unix_sec: at.as_secs() as i64,
                exited_at_nsec: at.subsec_nanos(),
                ..Default::default()
            })
        })
    }


    fn tty_win_resize(&self, _ctx: &TtrpcContext, req: TtyWinResizeRequest) -> ttrpc::Result<Empty> {
        self.call("TtyWinResize", || self.sandbox.tty_resize(&req).map(|_| Empty::new()))
    }

    fn get_oom_event(&self, ctx: &TtrpcContext, _req: Empty) -> ttrpc::Result<OomEvent> {
        let cancelled = cancel_probe(ctx);
        self.call("GetOomEvent", || {
            let id = self.sandbox.next_oom_event(&cancelled)?;
            Ok(OomEvent { container_id: id, ..Default::default() })
        })
    }

    fn update_interface(&self, _ctx: &TtrpcContext, req: UpdateInterfaceRequest) -> ttrpc::Result<Interface> {
        self.call("UpdateInterface", || {
            let iface = req
                .interface
                .as_ref()
                .ok_or_else(|| SandboxError::Invalid("UpdateInterface needs an interface".into()))?;
            self.sandbox.update_interface(iface)
        })
    }

    fn update_routes(&self, _ctx: &TtrpcContext, req: UpdateRoutesRequest) -> ttrpc::Result<UpdateRoutesRequest> {
        self.call("UpdateRoutes", || {
            Ok(UpdateRoutesRequest { routes: self.sandbox.update_routes(&req.routes)?, ..Default::default() })
        })
    }

}
