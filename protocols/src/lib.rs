//! wisp's wire protocols, shared by every component that speaks them:
//! - `vmm`: the VMM control API (`wisp-vmm --api-sock`);
//! - `agent`: the guest agent API (vsock port 1024);
//! - `exit`: the set-once cell an exit status is recorded in and waited for (agent and shim);
//! - `hybrid_vsock`: the host side of Firecracker-style hybrid vsock (`CONNECT <port>`);
//! - `ids`: the rule for container and exec ids, which the shim and the agent both check;
//! - `mac`: MAC address parsing, for the VMM's command line and the agent's interfaces.

#[allow(warnings, clippy::all)]
pub mod vmm {
    include!(concat!(env!("OUT_DIR"), "/vmm.rs"));
}

#[allow(warnings, clippy::all)]
pub mod vmm_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/vmm_ttrpc.rs"));
}

#[allow(warnings, clippy::all)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(warnings, clippy::all)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

pub mod exit;
pub mod hybrid_vsock;
pub mod ids;
pub mod mac;
pub mod stdio;

/// Version of the agent API. The shim refuses an agent that reports another one.
pub const AGENT_API_VERSION: u32 = 1;
/// Guest vsock port of the agent's ttrpc service.
pub const AGENT_TTRPC_PORT: u32 = 1024;
/// Guest vsock port of the agent's stdio streams.
pub const AGENT_STDIO_PORT: u32 = 1025;
