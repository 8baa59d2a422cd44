//! The shim's connection to the guest agent: dialed through hybrid vsock with a
//! per-attempt timeout and an overall deadline, version-checked, and every call bounded
//! by the configured RPC timeout (long polls use their own, longer, waits).

use std::os::fd::IntoRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use wisp_protocols::agent::CheckRequest;
use wisp_protocols::agent_ttrpc::AgentClient;
use wisp_protocols::{hybrid_vsock, AGENT_API_VERSION, AGENT_TTRPC_PORT};

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

/// An agent call's error, for messages: ttrpc status text is the agent's message.
pub fn call_error(call: &'static str, e: ttrpc::Error) -> AgentError {
    // The agent's words are the guest's: capped, no control characters.
    let reason = match e {
        ttrpc::Error::RpcStatus(s) => crate::bounds::guest_text(s.message(), crate::bounds::MAX_GUEST_ERROR, false),
        other => crate::bounds::guest_text(&other.to_string(), crate::bounds::MAX_GUEST_ERROR, false),
    };
    AgentError::Call { call, reason }
}
