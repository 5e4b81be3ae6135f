//! KVM state: the VM, its memory, its vCPUs.

pub mod lifecycle;
pub mod memory;
pub mod vcpu;
pub mod vm;
