//! The shim's connection to the guest agent: dialed through hybrid vsock with a
//! per-attempt timeout and an overall deadline, version-checked, and every call bounded
//! by the configured RPC timeout (long polls use their own, longer, waits).

use std::os::fd::IntoRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use wisp_protocols::agent::CheckRequest;
use wisp_protocols::agent_ttrpc::AgentClient;
use wisp_protocols::{hybrid_vsock, AGENT_API_VERSION, AGENT_TTRPC_PORT};

use crate::pod::TaskError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the guest agent did not answer within {waited:?}: {reason}")]
    Unreachable { waited: Duration, reason: String },
    #[error("the guest agent speaks API version {agent}, this shim speaks {shim}: install matching wisp-agent (initrd) and shim")]
    Version { agent: u32, shim: u32 },
    #[error("agent {call}: {reason}")]
    Call { call: &'static str, reason: String },
}

pub struct Agent {
    pub client: AgentClient,
    rpc_timeout: Duration,
}

impl Agent {
    /// Dials the agent until `deadline`; `vm_gone` is polled between attempts so a VM
    /// that died fails the dial at once instead of at the deadline.
    pub fn connect(
        vsock: &Path,
        attempt: Duration,
        deadline: Duration,
        rpc_timeout: Duration,
        vm_gone: &dyn Fn() -> Option<String>,
    ) -> Result<Self, AgentError> {
        let start = Instant::now();
        let mut last = String::from("no attempt made");
        while start.elapsed() < deadline {
            if let Some(why) = vm_gone() {
                return Err(AgentError::Unreachable {
                    waited: start.elapsed(),
                    reason: format!("the VM ended: {why}"),
                });
            }
            let left = deadline.saturating_sub(start.elapsed());
            match hybrid_vsock::connect(vsock, AGENT_TTRPC_PORT, attempt.min(left)) {
                Ok(stream) => {
                    let client = ttrpc::Client::new(stream.into_raw_fd())
                        .map_err(|e| AgentError::Unreachable { waited: start.elapsed(), reason: e.to_string() })?;
                    let agent = Self { client: AgentClient::new(client), rpc_timeout };
                    match agent.check(attempt.max(Duration::from_secs(1))) {
                        Ok(()) => return Ok(agent),
                        Err(e @ AgentError::Version { .. }) => return Err(e),
                        Err(e) => last = e.to_string(),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(AgentError::Unreachable { waited: start.elapsed(), reason: last })
    }

    fn check(&self, timeout: Duration) -> Result<(), AgentError> {
        let req = CheckRequest { api_version: AGENT_API_VERSION, ..Default::default() };
        let resp = self
            .client
            .check(ttrpc::context::with_timeout(timeout.as_nanos() as i64), &req)
            .map_err(|e| AgentError::Call { call: "Check", reason: e.to_string() })?;
        if resp.api_version != AGENT_API_VERSION {
            return Err(AgentError::Version { agent: resp.api_version, shim: AGENT_API_VERSION });
        }
        log::info!("agent {} (API {}) answered", resp.agent_version, resp.api_version);
        Ok(())
    }

    /// A context bounded by the RPC timeout.
    pub fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(self.rpc_timeout.as_nanos() as i64)
    }

    /// A context without a deadline, for long polls that end when the VM does.
    pub fn long_poll_ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_timeout(0)
    }
}

/// An agent call's error as the task API's: the class the agent gave it (its ttrpc code:
/// a container it does not know is NotFound, a bad spec InvalidArgument, a process
/// already exited NotFound, a wrong state FailedPrecondition), the message bounded. A
/// broken connection or any other code is Internal.
pub fn task_error(call: &'static str, e: ttrpc::Error) -> TaskError {
    use ttrpc::Code;
    let code = match &e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        _ => Code::INTERNAL,
    };
    let msg = call_error(call, e).to_string();
    match code {
        Code::NOT_FOUND => TaskError::NotFound(msg),
        Code::ALREADY_EXISTS => TaskError::AlreadyExists(msg),
        Code::FAILED_PRECONDITION => TaskError::FailedPrecondition(msg),
        Code::INVALID_ARGUMENT => TaskError::InvalidArgument(msg),
        _ => TaskError::Internal(msg),
    }
}

/// An agent call's error, for messages: ttrpc status text is the agent's message.
pub fn call_error(call: &'static str, e: ttrpc::Error) -> AgentError {
    // The agent's words are the guest's: capped, no control characters.
    let reason = match e {
        ttrpc::Error::RpcStatus(s) => crate::bounds::guest_text(s.message(), crate::bounds::MAX_GUEST_ERROR, false),
        other => crate::bounds::guest_text(&other.to_string(), crate::bounds::MAX_GUEST_ERROR, false),
    };
    AgentError::Call { call, reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn agent_errors_keep_their_class() {
        let status = |c| ttrpc::Error::RpcStatus(ttrpc::get_status(c, "no container \"x\"\u{1b}[31m"));
        let class = |e: TaskError| match e {
            TaskError::NotFound(m) => ("not found", m),
            TaskError::AlreadyExists(m) => ("exists", m),
            TaskError::FailedPrecondition(m) => ("precondition", m),
            TaskError::InvalidArgument(m) => ("invalid", m),
            TaskError::Internal(m) => ("internal", m),
        };
        let (c, m) = class(task_error("SignalProcess", status(ttrpc::Code::NOT_FOUND)));
        assert_eq!(c, "not found");
        assert!(m.starts_with("agent SignalProcess: no container"), "{m}");
        assert!(!m.contains('\u{1b}'), "the guest's control characters reach the message: {m:?}");
        assert_eq!(class(task_error("CreateContainer", status(ttrpc::Code::INVALID_ARGUMENT))).0, "invalid");
        assert_eq!(class(task_error("CreateContainer", status(ttrpc::Code::ALREADY_EXISTS))).0, "exists");
        assert_eq!(class(task_error("StartContainer", status(ttrpc::Code::FAILED_PRECONDITION))).0, "precondition");
        assert_eq!(class(task_error("StatsContainer", status(ttrpc::Code::DEADLINE_EXCEEDED))).0, "internal");
        assert_eq!(class(task_error("ExecProcess", ttrpc::Error::LocalClosed)).0, "internal");
    }

    /// An agent that answers Check with `api_version`.
    struct FakeAgent {
        api_version: u32,
        checks: std::sync::atomic::AtomicU32,
    }

    impl wisp_protocols::agent_ttrpc::Agent for FakeAgent {
        fn check(
            &self,
            _ctx: &ttrpc::TtrpcContext,
            req: CheckRequest,
        ) -> ttrpc::Result<wisp_protocols::agent::CheckResponse> {
            assert_eq!(req.api_version, AGENT_API_VERSION, "the shim sends its own version");
            self.checks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(wisp_protocols::agent::CheckResponse {
                api_version: self.api_version,
                agent_version: "fake".into(),
                ..Default::default()
            })
        }
    }

    /// A fake VM: a ttrpc agent on a Unix socket, reached the way the shim reaches the
    /// real one, through a hybrid-vsock socket that answers `CONNECT 1024` with `OK` and
    /// then relays the bytes. Returns the vsock socket's path and the agent.
    fn fake_vm(dir: &Path, api_version: u32) -> (std::path::PathBuf, ttrpc::Server, Arc<FakeAgent>) {
        use std::io::{BufRead, Write};
        let agent = Arc::new(FakeAgent { api_version, checks: Default::default() });
        let agent_sock = dir.join("agent.sock");
        let service: Arc<dyn wisp_protocols::agent_ttrpc::Agent + Send + Sync> = agent.clone();
        let mut server = ttrpc::Server::new()
            .bind(&format!("unix://{}", agent_sock.display()))
            .unwrap()
            .register_service(wisp_protocols::agent_ttrpc::create_agent(service));
        server.start().unwrap();
        let vsock = dir.join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&vsock).unwrap();
        std::thread::spawn(move || {
            for host in listener.incoming() {
                let Ok(mut host) = host else { return };
                let mut line = String::new();
                std::io::BufReader::new(host.try_clone().unwrap()).read_line(&mut line).unwrap();
                assert_eq!(line, format!("CONNECT {AGENT_TTRPC_PORT}\n"));
                let guest = std::os::unix::net::UnixStream::connect(&agent_sock).unwrap();
                host.write_all(b"OK 1073741824\n").unwrap();
                for (mut from, mut to) in [(host.try_clone().unwrap(), guest.try_clone().unwrap()), (guest, host)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        (vsock, server, agent)
    }

    fn connect(vsock: &Path) -> Result<Agent, AgentError> {
        let s = Duration::from_secs;
        Agent::connect(vsock, s(5), s(30), s(5), &|| None)
    }

    #[test]
    fn an_agent_of_another_api_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (vsock, _server, agent) = fake_vm(dir.path(), AGENT_API_VERSION + 1);
        match connect(&vsock) {
            Err(AgentError::Version { agent, shim }) => {
                assert_eq!((agent, shim), (AGENT_API_VERSION + 1, AGENT_API_VERSION));
            }
            Err(e) => panic!("want a version error, got: {e}"),
            Ok(_) => panic!("the shim accepted an agent of API version {}", AGENT_API_VERSION + 1),
        }
        // Refused at the first answer: a version mismatch is not retried until the deadline.
        assert_eq!(agent.checks.load(std::sync::atomic::Ordering::SeqCst), 1);
        let msg = connect(&vsock).err().unwrap().to_string();
        assert!(msg.contains(&format!("API version {}", AGENT_API_VERSION + 1)), "{msg}");
    }

    #[test]
    fn an_agent_of_the_same_api_version_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let (vsock, _server, agent) = fake_vm(dir.path(), AGENT_API_VERSION);
        let a = connect(&vsock).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(agent.checks.load(std::sync::atomic::Ordering::SeqCst), 1);
        // The connection is the agent's: a second Check goes through it.
        let again = a.client.check(a.ctx(), &CheckRequest { api_version: AGENT_API_VERSION, ..Default::default() });
        assert_eq!(again.unwrap().api_version, AGENT_API_VERSION);
    }
}
