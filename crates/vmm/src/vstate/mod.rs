//! KVM state: the VM (with guest RAM mapped into it), its vCPUs, how they pause and end.

pub(crate) mod lifecycle;
pub(crate) mod vcpu;
pub(crate) mod vm;
