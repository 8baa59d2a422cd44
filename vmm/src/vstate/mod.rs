//! KVM state of a micro-VM: the VM file descriptor with its memory and in-kernel
//! interrupt controllers, and the vCPUs with their run loops.

pub mod vcpu;
pub mod vm;
