//! wisp-shim: the library behind containerd-shim-wisp-v2, containerd's shim v2 for wisp.
//! containerd starts the binary (`main.rs`) for the runtime type `io.containerd.wisp.v2`;
//! it runs each pod in its own micro-VM. The modules live here so that wisp's tests can
//! use them too (the mount table parser, `mountinfo`; the benchmark dials the agent with
//! `agent`), and so do its fuzz targets (`fuzz/`: `options`, `spec`); only what those
//! and the binary need is public.

pub mod agent;
mod bounds;
mod cgroup;
mod cleanup;
mod container;
mod events;
#[cfg(test)]
mod fakepod;
mod hooks;
mod hostfs;
pub mod info;
mod io;
mod logger;
mod metrics;
pub mod mountinfo;
pub mod mountns;
mod mounts;
mod network;
mod pod;
pub mod options;
mod pidfd;
mod sandbox;
mod service;
mod share;
pub mod shim;
mod spawn;
mod template;
pub mod spec;
mod vm;
mod vmpod;
mod vmstart;
