//! The containerd task API (v2) on top of `Sandbox`: request decoding, error codes,
//! responses. No VM or agent logic lives here.

use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim_protos::api::{
    self, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest, DeleteResponse, Empty,
    ExecProcessRequest, KillRequest, PauseRequest, PidsRequest, PidsResponse, ProcessInfo, ResizePtyRequest, ResumeRequest,
    ShutdownRequest, StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, UpdateTaskRequest,
    WaitRequest, WaitResponse,
};
use containerd_shim_protos::api::Status as TaskStatus;
use containerd_shim_protos::Task;
use ttrpc::{Code, TtrpcContext};

use crate::container::Status;
use crate::io::StdioPaths;
use crate::events::timestamp;
use crate::pod::TaskError;
use crate::sandbox::{CreateRequest, Sandbox};

pub struct TaskService {
    pub sandbox: Arc<Sandbox>,
}

fn status(e: TaskError) -> ttrpc::Error {
    let code = match &e {
        TaskError::NotFound(_) => Code::NOT_FOUND,
        TaskError::AlreadyExists(_) => Code::ALREADY_EXISTS,
        TaskError::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
        TaskError::InvalidArgument(_) => Code::INVALID_ARGUMENT,
        TaskError::Internal(_) => Code::INTERNAL,
    };
    log::warn!("task call failed: {e}");
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
}

/// Refuses an id containerd sent that the agent would refuse (`wisp_protocols::ids`):
/// checked on receipt, so a bad id fails before any VM boots or anything is mounted.
fn check_id(kind: &str, id: &str) -> Result<(), TaskError> {
    wisp_protocols::ids::check_id(id).map_err(|why| {
        TaskError::InvalidArgument(format!("{kind} id {:?} is invalid: {why}", id.chars().take(64).collect::<String>()))
    })
}

/// Create's request as `Sandbox::create` takes it, once its id and options are known good.
fn create_request(req: CreateTaskRequest) -> Result<CreateRequest, TaskError> {
    check_id("container", &req.id)?;
    let config_path = crate::options::config_path_from_options(req.options.as_ref())
        .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
    Ok(CreateRequest {
        id: req.id,
        bundle: PathBuf::from(&req.bundle),
        rootfs: req.rootfs,
        stdio: StdioPaths { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal },
        config_path,
    })
}

fn to_task_status(s: Status) -> TaskStatus {
    match s {
        // containerd has no word for these; its Create or Start call has not returned.
        Status::Creating => TaskStatus::UNKNOWN,
        Status::Created | Status::Starting => TaskStatus::CREATED,
        Status::Running => TaskStatus::RUNNING,
        Status::Paused => TaskStatus::PAUSED,
        Status::Stopped => TaskStatus::STOPPED,
    }
}

impl Task for TaskService {
    fn create(&self, _: &TtrpcContext, req: CreateTaskRequest) -> ttrpc::Result<CreateTaskResponse> {
        self.sandbox.create(create_request(req).map_err(status)?).map_err(status)?;
        Ok(CreateTaskResponse { pid: std::process::id(), ..Default::default() })
    }

    fn start(&self, _: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let pid = self.sandbox.start(&req.id, &req.exec_id).map_err(status)?;
        Ok(StartResponse { pid, ..Default::default() })
    }

    fn delete(&self, _: &TtrpcContext, req: DeleteRequest) -> ttrpc::Result<DeleteResponse> {
        let (pid, exit) = self.sandbox.delete(&req.id, &req.exec_id).map_err(status)?;
        Ok(DeleteResponse { pid, exit_status: exit.status, exited_at: protobuf::MessageField::some(timestamp(exit.at)), ..Default::default() })
    }

    fn exec(&self, _: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        check_id("exec", &req.exec_id).map_err(status)?;
        let spec = req.spec.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        if spec.is_empty() {
            return Err(status(TaskError::InvalidArgument(format!("exec {}: no process spec", req.exec_id))));
        }
        let stdio = StdioPaths { stdin: req.stdin, stdout: req.stdout, stderr: req.stderr, terminal: req.terminal };
        self.sandbox.add_exec(&req.id, &req.exec_id, stdio, spec).map_err(status)?;
        Ok(Empty::new())
    }

    fn state(&self, _: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let (st, stdio, exit, bundle) = self.sandbox.state(&req.id, &req.exec_id).map_err(status)?;
        let mut resp = StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: bundle.display().to_string(),
            pid: std::process::id(),
            stdin: stdio.stdin,
            stdout: stdio.stdout,
            stderr: stdio.stderr,
            terminal: stdio.terminal,
            ..Default::default()
        };
        resp.status = to_task_status(st).into();
        if let Some(e) = exit {
            resp.exit_status = e.status;
            resp.exited_at = protobuf::MessageField::some(timestamp(e.at));
        }
        Ok(resp)
    }

    fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        let pids = self.sandbox.pids(&req.id).map_err(status)?;
        let processes = pids.into_iter().map(|pid| ProcessInfo { pid, ..Default::default() }).collect();
        Ok(PidsResponse { processes, ..Default::default() })
    }

    fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        self.sandbox.pause(&req.id, true).map_err(status)?;
        Ok(Empty::new())
    }

    fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        self.sandbox.pause(&req.id, false).map_err(status)?;
        Ok(Empty::new())
    }

    fn kill(&self, _: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        self.sandbox.kill(&req.id, &req.exec_id, req.signal, req.all).map_err(status)?;
        Ok(Empty::new())
    }

    fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.sandbox.resize_pty(&req.id, &req.exec_id, req.width, req.height).map_err(status)?;
        Ok(Empty::new())
    }

    fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> ttrpc::Result<Empty> {
        if req.stdin {
            self.sandbox.close_stdin(&req.id, &req.exec_id).map_err(status)?;
        }
        Ok(Empty::new())
    }

    fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        let resources = req.resources.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        if resources.is_empty() {
            return Ok(Empty::new());
        }
        self.sandbox.update(&req.id, resources).map_err(status)?;
        Ok(Empty::new())
    }

    fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let exit = self.sandbox.wait(&req.id, &req.exec_id).map_err(status)?;
        Ok(WaitResponse { exit_status: exit.status, exited_at: protobuf::MessageField::some(timestamp(exit.at)), ..Default::default() })
    }

    fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        let s = self.sandbox.stats(&req.id).map_err(status)?;
        let any = crate::metrics::to_any(&crate::metrics::to_metrics(&s)).map_err(|e| status(TaskError::Internal(e.to_string())))?;
        Ok(StatsResponse { stats: protobuf::MessageField::some(any), ..Default::default() })
    }

    fn connect(&self, _: &TtrpcContext, _req: ConnectRequest) -> ttrpc::Result<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if self.sandbox.is_empty() {
            self.sandbox.shutdown_now();
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(id: &str) -> CreateTaskRequest {
        CreateTaskRequest { id: id.into(), bundle: "/nonexistent/bundle".into(), ..Default::default() }
    }

    #[test]
    fn ids_the_agent_would_refuse_are_refused_on_receipt() {
        // "a b" and "ünï" got past Sandbox::create's own check and failed only in the
        // agent, after the VM had booted.
        for (id, why) in [
            ("a b", "only letters, digits and _ - . + are allowed"),
            ("ünï", "only letters, digits and _ - . + are allowed"),
            ("a/b", "only letters, digits and _ - . + are allowed"),
            (".hidden", "it must not start with '.'"),
            ("", "it is empty"),
        ] {
            let e = create_request(create(id)).err().unwrap_or_else(|| panic!("{id:?} was accepted"));
            assert!(matches!(e, TaskError::InvalidArgument(_)), "{id:?}: {e}");
            assert_eq!(e.to_string(), format!("container id {id:?} is invalid: {why}"));
        }
        let long = "x".repeat(300);
        let e = create_request(create(&long)).err().unwrap().to_string();
        assert!(e.starts_with(&format!("container id {:?} is invalid: it is longer than", &long[..64])), "{e}");

        let e = check_id("exec", "e 1").unwrap_err();
        assert!(matches!(e, TaskError::InvalidArgument(_)), "{e}");
        assert_eq!(e.to_string(), "exec id \"e 1\" is invalid: only letters, digits and _ - . + are allowed");
    }

    #[test]
    fn a_good_create_request_is_passed_on_as_sent() {
        let mut req = create("c1-abc_1.2+x");
        req.stdout = "/run/out".into();
        req.terminal = true;
        let c = create_request(req).unwrap();
        assert_eq!(c.id, "c1-abc_1.2+x");
        assert_eq!(c.bundle, PathBuf::from("/nonexistent/bundle"));
        assert_eq!((c.stdio.stdout.as_str(), c.stdio.terminal), ("/run/out", true));
        assert_eq!(c.config_path, None);
        assert!(check_id("exec", "exec-1").is_ok());
    }
}
