//! wisp-vmm: a virtual machine monitor for one pod's micro-VM, on the rust-vmm crates.
//!
//! The guest is untrusted: everything read from guest memory or guest-written registers
//! is validated before use, and a misbehaving guest can at worst stop its own VM.

pub mod devices;
