//! KVM state: the VM, its memory, its vCPUs.

pub(crate) mod lifecycle;
pub mod memory;
pub(crate) mod vcpu;
pub(crate) mod vm;
